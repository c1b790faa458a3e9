"""The instance's whole life from deploy.yaml, against moto's EC2 and SSM and the loopback sshd:
`orch up` creates it from `ec2.launch` (once; on-demand or spot), `orch deploy` too, a created
instance that a failed command leaves is stopped, `orch down --terminate` deletes it (cancelling
its spot request first); EC2's refusal of a spot request is one line, or an on-demand instance
with fallback_on_demand; and an instance whose SSH is broken is still shown by `orch status` and
still stopped by `orch down` (through EC2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from tests.integration.conftest import SpotMarket, Sshd, on_a_terminal, run_orch, write_config
from tests.servers import free_port
from trainer.contract import layout
from trainer.machine.proc import pid_line
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
TRAIN = {"epochs": 2, "batch_size": 16, "hidden": 8, "attention": 4, "seed": 1, "patience": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("launch-data")
    synth(root, n=60, dim=8, seed=3, min_frames=4, max_frames=6)
    return root


def aws(endpoint: str, service: str = "ec2"):  # noqa: ANN201
    return boto3.client(service, region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def named(endpoint: str, name: str) -> list[dict]:
    """Every instance with this Name tag, terminated ones included."""
    pages = aws(endpoint).describe_instances(Filters=[{"Name": "tag:Name", "Values": [name]}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def alive(endpoint: str, name: str) -> list[dict]:
    return [i for i in named(endpoint, name) if i["State"]["Name"] not in ("terminated", "shutting-down")]


def state_of(endpoint: str, instance_id: str) -> str:
    pages = aws(endpoint).describe_instances(InstanceIds=[instance_id])
    return pages["Reservations"][0]["Instances"][0]["State"]["Name"]


def an_image(endpoint: str) -> str:
    return aws(endpoint).describe_images()["Images"][0]["ImageId"]


def config(tmp_path: Path, sshd: Sshd, data: Path, endpoint: str, *, ec2: dict, known: bool = False,
           ssh: dict | None = None, **sections: object) -> Path:
    """deploy.yaml for an EC2 instance reached at the loopback sshd (ssh.host overrides the
    address moto makes up); its host key known in advance only with ``known``."""
    known_hosts = tmp_path / "known_hosts"
    if known and not known_hosts.exists():
        known_hosts.write_text(sshd.known_hosts_line())
    return write_config(
        tmp_path / "deploy.yaml", target="ec2",
        ec2={"region": "us-east-1", "endpoint_url": endpoint, **ec2},
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(known_hosts), **(ssh or {})},
        **({"remote": {"root": str(tmp_path / "remote"), "python": sys.executable},
            "data": {"remote_dir": str(data)}, "train": {**TRAIN, "cache_dir": str(tmp_path / "cache")}} | sections))


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line an error gets: last on stderr, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("orch: error:")] == lines[-1:], proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


def spot_requests(endpoint: str, request_id: str) -> list[dict]:
    return aws(endpoint).describe_spot_instance_requests(
        Filters=[{"Name": "spot-instance-request-id", "Values": [request_id]}])["SpotInstanceRequests"]


def test_up_creates_the_instance_from_the_spec_once(tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str,
                                                    aws_creds: None, console_fingerprints: Callable) -> None:
    ec2 = aws(moto_endpoint)
    image = an_image(moto_endpoint)
    parameter = f"/orch-test/{tmp_path.name}/deeplearning/ami-id"  # moto reserves /aws/ for its own
    aws(moto_endpoint, "ssm").put_parameter(Name=parameter, Value=image, Type="String")
    group = ec2.create_security_group(GroupName=f"ssh-{tmp_path.name}", Description="ssh from me")["GroupId"]
    ec2.create_key_pair(KeyName=f"key-{tmp_path.name}")
    name = f"spec-{tmp_path.name}"
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name, "launch": {
        "instance_type": "g4dn.xlarge", "ami": parameter, "key_name": f"key-{tmp_path.name}",
        "security_group_ids": [group], "volume_gb": 123}})

    # A read-only command never creates it: it says how to.
    st = run_orch("status", "-c", cfg)
    assert st.returncode == 3 and "`orch up` (or `orch deploy`) creates it" in error_line(st)
    assert named(moto_endpoint, name) == []

    # Created, running, and its host key matches nothing on its console: refused, left running.
    console_fingerprints("SHA256:" + "A" * 43)
    refused = run_orch("up", "-c", cfg)
    assert refused.returncode == 5 and "matches none of the fingerprints" in refused.stderr, refused.stderr
    assert "is running: `orch down` stops it" in error_line(refused) and "created instance" in refused.stderr
    [inst] = alive(moto_endpoint, name)
    assert inst["State"]["Name"] == "running"

    # The console shows the key: trusted, remembered; the same instance, nothing created.
    console_fingerprints(sshd.host_fingerprint)
    up = run_orch("up", "-c", cfg)
    assert up.returncode == 0 and f"{inst['InstanceId']} running" in up.stdout, up.stderr
    assert "created instance" not in up.stderr and "it matches the instance's console output" in up.stderr
    assert sshd.host_key_pub.split()[1] in (tmp_path / "known_hosts").read_text()
    again = run_orch("up", "-c", cfg)
    assert again.returncode == 0 and "created" not in again.stderr and "accepting" not in again.stderr

    [inst] = alive(moto_endpoint, name)
    assert len(named(moto_endpoint, name)) == 1
    assert inst["InstanceType"] == "g4dn.xlarge" and inst["ImageId"] == image  # the AMI the parameter holds
    assert inst["KeyName"] == f"key-{tmp_path.name}"
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [group]
    assert {t["Key"]: t["Value"] for t in inst["Tags"]} == {"Name": name, "orch:managed": "true"}
    [root] = [b for b in inst["BlockDeviceMappings"] if b["DeviceName"] == inst["RootDeviceName"]]
    [volume] = ec2.describe_volumes(VolumeIds=[root["Ebs"]["VolumeId"]])["Volumes"]
    assert volume["Size"] == 123 and root["Ebs"]["DeleteOnTermination"]
    status = json.loads(run_orch("status", "-c", cfg, "--json").stdout)
    assert status["instance"]["managed"] and status["instance"]["type"] == "g4dn.xlarge"


@pytest.mark.parametrize("launch, code, expected", [
    ({"ami": "/orch-test/no/such/parameter"}, 3, "ParameterNotFound"),
    ({"ami": "ami-0123456789abcdef0"}, 3, "check ec2.launch.ami"),
    ({"volume_gb": 10}, 2, "10 GB is smaller than the root disk of AMI"),  # moto's AMIs have 15 GB
])
def test_a_spec_that_cannot_be_created_is_one_line_and_creates_nothing(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None, launch: dict, code: int,
        expected: str) -> None:
    name = f"bad-{tmp_path.name}"
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name, "launch": {
        "instance_type": "g5.xlarge", "ami": an_image(moto_endpoint), **launch}})
    proc = run_orch("up", "-c", cfg)
    assert proc.returncode == code and expected in error_line(proc), proc.stderr
    assert named(moto_endpoint, name) == []


def test_deploy_creates_the_instance_when_there_is_none(tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str,
                                                       aws_creds: None, console_fingerprints: Callable) -> None:
    from tests.integration.test_deploy import wait_final

    console_fingerprints(sshd.host_fingerprint)
    name = f"deployed-{tmp_path.name}"
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name, "launch": {
        "instance_type": "g5.xlarge", "ami": an_image(moto_endpoint)}})
    proc = run_orch("deploy", "-c", cfg, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "created instance" in proc.stderr
    [inst] = alive(moto_endpoint, name)
    assert inst["State"]["Name"] == "running" and inst["InstanceType"] == "g5.xlarge"
    assert wait_final(Path(json.loads(proc.stdout)["run_dir"]))["state"] == "finished"


def test_up_creates_a_spot_instance_and_terminate_cancels_its_request(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None,
        console_fingerprints: Callable, spot_market: SpotMarket) -> None:
    console_fingerprints(sshd.host_fingerprint)
    name = f"spot-{tmp_path.name}"
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name, "launch": {
        "instance_type": "g5.xlarge", "ami": an_image(moto_endpoint),
        "spot": {"interruption": "stop", "max_price": 0.5}}})
    up = run_orch("up", "-c", cfg)
    assert up.returncode == 0, up.stderr
    assert "(g5.xlarge, spot, persistent, max $0.5/hour," in up.stderr  # the "created instance" line
    # a persistent request: EC2 stops the instance when it takes it back, and starts it again
    assert spot_market.asked == [{"MarketType": "spot", "SpotOptions": {
        "SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop", "MaxPrice": "0.5"}}]
    [inst] = alive(moto_endpoint, name)
    assert inst["InstanceLifecycle"] == "spot" and inst["SpotInstanceRequestId"].startswith("sir-")
    [request] = spot_requests(moto_endpoint, inst["SpotInstanceRequestId"])
    assert request["Type"] == "persistent" and request["InstanceId"] == inst["InstanceId"]
    shutdown = aws(moto_endpoint).describe_instance_attribute(InstanceId=inst["InstanceId"],
                                                              Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"

    doc = json.loads(run_orch("status", "-c", cfg, "--json").stdout)["instance"]
    assert doc["market"] == "spot" and doc["spot"] and doc["cost"]["hourly_usd"] == 0.00001  # moto's spot price
    text = run_orch("status", "-c", cfg).stdout
    assert f"instance {inst['InstanceId']} (g5.xlarge, spot): running" in text
    assert "$0.00001/hour (current spot price in us-east-1" in text
    again = run_orch("up", "-c", cfg)
    assert again.returncode == 0 and "created" not in again.stderr and len(spot_market.asked) == 1

    # Terminating cancels the persistent request first, which would launch a new instance.
    gone = run_orch("down", "--terminate", "-y", "-c", cfg)
    assert gone.returncode == 0 and f"{inst['InstanceId']} terminated" in gone.stdout, gone.stderr
    assert f"cancelling spot request {inst['SpotInstanceRequestId']} first" in gone.stderr
    assert spot_requests(moto_endpoint, inst["SpotInstanceRequestId"]) == []  # moto forgets a cancelled one
    assert alive(moto_endpoint, name) == []


def test_a_refused_spot_request_is_one_line_or_an_on_demand_instance_with_fallback(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None,
        console_fingerprints: Callable, spot_market: SpotMarket) -> None:
    console_fingerprints(sshd.host_fingerprint)
    name = f"refused-{tmp_path.name}"
    launch = {"instance_type": "g5.xlarge", "ami": an_image(moto_endpoint), "spot": {}}
    spot_market.refuse = {"spot": "InsufficientInstanceCapacity"}

    # Asked once (a capacity refusal is HTTP 500, which botocore would retry 5 times), exit 3.
    refused = run_orch("up", "-c", config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name, "launch": launch}))
    line = error_line(refused)
    assert refused.returncode == 3 and "EC2 refused the spot request (g5.xlarge, up to the on-demand price, " \
        "any zone of us-east-1): InsufficientInstanceCapacity: There is no capacity" in line, refused.stderr
    assert "or set ec2.launch.fallback_on_demand: true" in line
    assert spot_market.asked == [{"MarketType": "spot", "SpotOptions": {
        "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}]
    assert named(moto_endpoint, name) == []

    # With fallback_on_demand, and on-demand refused too: one line saying both, nothing created.
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name, "launch": {
        **launch, "fallback_on_demand": True}})
    spot_market.refuse = {"spot": "SpotMaxPriceTooLow", "on-demand": "InsufficientInstanceCapacity"}
    both = run_orch("up", "-c", cfg)
    assert both.returncode == 3 and "EC2 refused the spot request (SpotMaxPriceTooLow) and the on-demand request " \
        "(g5.xlarge, any zone of us-east-1): InsufficientInstanceCapacity" in error_line(both), both.stderr
    assert [a.get("MarketType") for a in spot_market.asked[1:]] == ["spot", None]
    assert named(moto_endpoint, name) == []

    # On-demand has capacity: created, and said so.
    spot_market.refuse = {"spot": "InsufficientInstanceCapacity"}
    up = run_orch("up", "-c", cfg)
    assert up.returncode == 0, up.stderr
    assert "EC2 refused the spot request (InsufficientInstanceCapacity: There is no capacity for your request " \
        "(InsufficientInstanceCapacity, a test)): creating an on-demand instance instead " \
        "(ec2.launch.fallback_on_demand)" in up.stderr
    assert "(g5.xlarge, on-demand," in up.stderr
    [inst] = alive(moto_endpoint, name)
    assert "InstanceLifecycle" not in inst and "SpotInstanceRequestId" not in inst
    assert json.loads(run_orch("status", "-c", cfg, "--json").stdout)["instance"]["market"] == "on-demand"


def test_a_created_instance_is_stopped_when_the_deploy_fails_and_terminate_deletes_it(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None,
        console_fingerprints: Callable) -> None:
    console_fingerprints(sshd.host_fingerprint)
    name = f"failed-{tmp_path.name}"
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name, "launch": {
        "instance_type": "g5.xlarge", "ami": an_image(moto_endpoint)}},
        remote={"root": str(tmp_path / "remote"), "python": "/no/such/python"})
    proc = run_orch("deploy", "-c", cfg)
    assert proc.returncode != 0 and "created instance" in proc.stderr
    [inst] = alive(moto_endpoint, name)
    assert "it was created for this command, which failed (stopped, not terminated" in proc.stderr
    assert state_of(moto_endpoint, inst["InstanceId"]) == "stopped"  # stopped, its disk kept: never terminated

    # Terminating asks first: without a terminal, only -y goes ahead.
    refused = run_orch("down", "--terminate", "-c", cfg)
    assert refused.returncode == 2 and "without one, pass -y" in error_line(refused)
    assert state_of(moto_endpoint, inst["InstanceId"]) == "stopped"
    gone = run_orch("down", "--terminate", "-y", "-c", cfg)
    assert gone.returncode == 0 and f"{inst['InstanceId']} terminated" in gone.stdout, gone.stderr
    assert "orch could not list them" in gone.stderr  # a stopped machine cannot say which runs go with it
    assert alive(moto_endpoint, name) == []


@pytest.fixture
def active_run(tmp_path: Path) -> Iterator[Path]:
    """A run on the machine whose trainer lives (a sleeper under its recorded pid)."""
    run = tmp_path / "remote" / layout.RUNS_DIR / "busy-run"
    run.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "600"])
    (run / layout.PID_FILE).write_text(pid_line(sleeper.pid))
    (run / layout.STATUS).write_text(json.dumps({"state": "running", "epoch": 1, "epochs": 10, "pid": sleeper.pid}))
    try:
        yield run
    finally:
        sleeper.kill()
        sleeper.wait()


def test_terminate_refuses_an_active_run_without_force_and_names_the_runs_it_deletes(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None, active_run: Path) -> None:
    ec2 = aws(moto_endpoint)
    name = f"term-{tmp_path.name}"
    iid = ec2.run_instances(ImageId=an_image(moto_endpoint), MinCount=1, MaxCount=1, InstanceType="g5.xlarge",
                            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}]
                            )["Instances"][0]["InstanceId"]
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name}, known=True)
    busy = run_orch("down", "--terminate", "-y", "-c", cfg)
    assert busy.returncode == 6 and "run busy-run is still running" in error_line(busy)
    assert "--force to terminate" in busy.stderr and state_of(moto_endpoint, iid) == "running"
    asked = run_orch("down", "--terminate", "--force", "-c", cfg)  # no terminal, no -y
    assert asked.returncode == 2 and state_of(moto_endpoint, iid) == "running"

    code, seen = on_a_terminal("down", "--terminate", "--force", "-c", cfg, question=b"Terminate instance",
                               answer=b"n\n")
    text = " ".join(seen.decode(errors="replace").split())  # the terminal wraps long lines
    assert code == 130 and "not created by orch" in text and "1 run(s): busy-run" in text
    assert state_of(moto_endpoint, iid) == "running"  # declined

    gone = run_orch("down", "--terminate", "--force", "-y", "-c", cfg)
    assert gone.returncode == 0 and f"{iid} terminated" in gone.stdout
    assert "Its disk is deleted with it" in gone.stderr and "1 run(s): busy-run" in gone.stderr
    assert state_of(moto_endpoint, iid) == "terminated"


def test_a_machine_that_cannot_be_reached_is_still_shown_and_stopped(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None) -> None:
    name = f"cut-{tmp_path.name}"
    iid = aws(moto_endpoint).run_instances(
        ImageId=an_image(moto_endpoint), MinCount=1, MaxCount=1, InstanceType="g5.xlarge",
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}]
    )["Instances"][0]["InstanceId"]
    closed = free_port()  # nothing listens there: sshd is dead, as far as orch can tell
    cfg = config(tmp_path, sshd, data, moto_endpoint, ec2={"name": name}, known=True,
                 ssh={"port": closed, "connect_timeout": 1})

    st = run_orch("status", "-c", cfg)
    assert st.returncode == 4, st.stderr
    assert f"instance {iid} (g5.xlarge, on-demand): running" in st.stdout and "$1.006/hour" in st.stdout
    assert "machine: unreachable: " in st.stdout and f"127.0.0.1:{closed}" in st.stdout
    doc = json.loads(run_orch("status", "-c", cfg, "--json").stdout)
    assert doc["instance"]["state"] == "running" and doc["instance"]["cost"]["hourly_usd"] == 1.006
    assert doc["machine"] is None and "does not accept SSH connections" in doc["unreachable"]
    assert doc["unreachable_code"] == 4

    refused = run_orch("down", "-c", cfg)  # no terminal, no -y: left as it is
    assert refused.returncode == 4 and "could not check for active runs" in error_line(refused)
    assert "`orch down -y` stops it anyway" in refused.stderr and state_of(moto_endpoint, iid) == "running"

    code, seen = on_a_terminal("down", "-c", cfg, question=b"Stop instance", answer=b"n\n")
    assert code == 130 and b"could not check for active runs" in seen and b"anyway?" in seen
    assert state_of(moto_endpoint, iid) == "running"

    stopped = run_orch("down", "-y", "-c", cfg)
    assert stopped.returncode == 0 and f"{iid} stopped" in stopped.stdout, stopped.stderr
    assert "could not check for active runs" in stopped.stderr and state_of(moto_endpoint, iid) == "stopped"
