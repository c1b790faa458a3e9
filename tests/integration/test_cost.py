"""Money: only deploy, resume and up start a stopped instance (moto says so); `orch down`
refuses while a run is active; `orch status` shows what the box costs; autostop runs its
command on the machine once, after the idle period, never while a run is active."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import boto3
import pytest

from tests.integration.conftest import Sshd, on_a_terminal, run_orch, write_config
from tests.integration.trainer_proc import metrics, status
from trainer.contract import layout
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
TINY = {"batch_size": 8, "hidden": 8, "attention": 4, "seed": 1}


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cost-features")
    synth(root, n=60, dim=8, seed=8, min_frames=4, max_frames=6)
    return root


def ec2_client(endpoint: str):  # noqa: ANN201
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def instance(endpoint: str, name: str, **kwargs: object) -> str:
    ec2 = ec2_client(endpoint)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    return ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="g5.xlarge", TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}], **kwargs)["Instances"][0]["InstanceId"]


def state_of(endpoint: str, instance_id: str) -> str:
    found = ec2_client(endpoint).describe_instances(InstanceIds=[instance_id])
    return found["Reservations"][0]["Instances"][0]["State"]["Name"]


def config(tmp_path: Path, sshd: Sshd, features: Path, *, target: str = "ec2", ec2: dict | None = None,
           **extra: object) -> Path:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    sections: dict = {
        "target": target,
        "ssh": {"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
                "key_file": str(sshd.client_key), "known_hosts": str(known_hosts)},
        "remote": {"root": str(tmp_path / "remote"), "python": sys.executable},
        "data": {"remote_dir": str(features)},
        "train": {**TINY, "cache_dir": str(tmp_path / "cache")}, **extra}
    if ec2 is not None:
        sections["ec2"] = {"region": "us-east-1", **ec2}
    return write_config(tmp_path / "deploy.yaml", **sections)


def test_read_only_commands_never_start_a_stopped_instance(tmp_path: Path, sshd: Sshd, features: Path,
                                                          moto_endpoint: str, aws_creds: None) -> None:
    iid = instance(moto_endpoint, f"stopped-{tmp_path.name}")
    ec2_client(moto_endpoint).stop_instances(InstanceIds=[iid])
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint})
    for command in (["runs"], ["logs"], ["monitor", "--once"], ["download"], ["stop"], ["status"], ["rm", "a-run", "-y"],
                    ["ssh"], ["tensorboard"], ["exec", "--", "touch", str(tmp_path / "ran")]):
        proc = run_orch(*command[:1], "-c", cfg, *command[1:])
        assert proc.returncode == 11, (command, proc.stderr)
        assert f"instance {iid} is stopped; `orch up` starts it" in proc.stderr
        assert state_of(moto_endpoint, iid) == "stopped", command
    from orchestrator.completion import run_ids

    assert run_ids(str(cfg)) == [] and state_of(moto_endpoint, iid) == "stopped"  # completing a run id starts nothing
    assert not (tmp_path / "remote").exists() and not (tmp_path / "ran").exists()  # nothing was asked of the machine
    st = run_orch("status", "-c", cfg, "--json")
    assert json.loads(st.stdout)["instance"]["type"] == "g5.xlarge"
    assert run_orch("up", "-c", cfg).returncode == 0 and state_of(moto_endpoint, iid) == "running"


def test_down_refuses_while_a_run_is_active(tmp_path: Path, sshd: Sshd, features: Path, moto_endpoint: str,
                                           aws_creds: None) -> None:
    iid = instance(moto_endpoint, f"busy-{tmp_path.name}")
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint})
    run = run_orch("deploy", "-c", cfg, "--json", "--run-id", "long", "--", "--epochs", "500")
    assert run.returncode == 0, run.stderr
    run_dir = Path(json.loads(run.stdout)["run_dir"])
    try:
        refused = run_orch("down", "-c", cfg)
        assert refused.returncode == 6 and "run long is still running" in refused.stderr
        assert state_of(moto_endpoint, iid) == "running"
        forced = run_orch("down", "-c", cfg, "--force")
        assert forced.returncode == 0 and f"{iid} stopped" in forced.stdout
        assert state_of(moto_endpoint, iid) == "stopped"
    finally:
        pid = int((run_dir / layout.PID_FILE).read_text().split()[0])
        os.kill(pid, 9)


def test_status_shows_the_cost(tmp_path: Path, sshd: Sshd, features: Path, moto_endpoint: str,
                               aws_creds: None) -> None:
    iid = instance(moto_endpoint, f"priced-{tmp_path.name}")
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint})
    doc = json.loads(run_orch("status", "-c", cfg, "--json").stdout)
    cost = doc["instance"]["cost"]
    assert doc["instance"]["state"] == "running" and cost["hourly_usd"] == 1.006  # the shipped g5.xlarge price
    assert "on-demand" in cost["source"] and cost["uptime_hours"] is not None and cost["so_far_usd"] >= 0
    text = run_orch("status", "-c", cfg).stdout
    assert "g5.xlarge" in text and "$1.006/hour" in text and "so far" in text and "autostop: off" in text
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint,
                                               "hourly_price": 0.5})
    assert json.loads(run_orch("status", "-c", cfg, "--json").stdout)["instance"]["cost"]["hourly_usd"] == 0.5
    spot = instance(moto_endpoint, f"spot-{tmp_path.name}", InstanceMarketOptions={"MarketType": "spot"})
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": spot, "endpoint_url": moto_endpoint})
    doc = json.loads(run_orch("status", "-c", cfg, "--json").stdout)
    assert doc["instance"]["spot"] and "spot price" in doc["instance"]["cost"]["source"]


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_autostop_runs_once_after_the_idle_period_and_never_during_a_run(tmp_path: Path, sshd: Sshd,
                                                                         features: Path) -> None:
    marker = tmp_path / "STOPPED"
    # 3 s of idleness (fractions of minutes allowed); the command writes a marker, once
    cfg = config(tmp_path, sshd, features, target="ssh",
                 autostop={"idle_minutes": 0.05, "command": f"echo stopped >> {marker}"})
    run = run_orch("deploy", "-c", cfg, "--json", "--", "--epochs", "8")
    out = json.loads(run.stdout)
    assert run.returncode == 0 and out["autostop"]["armed"] and out["autostop"]["watcher_alive"]
    run_dir = Path(out["run_dir"])
    while status(run_dir).get("state") not in layout.FINAL_STATES:
        assert not marker.exists(), "autostop fired while a run was active"
        time.sleep(0.2)
    assert len(metrics(run_dir)) == 8
    finished = time.monotonic()
    wait_for(marker.exists, 60, "the autostop command")
    assert time.monotonic() - finished >= 2.0  # not before the idle period
    time.sleep(4)
    assert marker.read_text() == "stopped\n"  # once
    log = (tmp_path / "remote" / layout.WATCHER_LOG).read_text()
    assert "no run active for" in log and "running" in log


def test_a_deploy_inside_the_idle_period_rearms_autostop_and_off_disarms(tmp_path: Path, sshd: Sshd,
                                                                          features: Path) -> None:
    marker = tmp_path / "STOPPED"
    # (tests never arm the default command: it would shut this machine down). The command
    # writes the machine's clock when it fires, so the test checks when, not how fast it looked.
    cfg = config(tmp_path, sshd, features, target="ssh",
                 autostop={"idle_minutes": 0.1, "command": f"date +%s.%N > {marker}"})

    def deploy_and_finish(*options: str) -> float:
        """The run's end on the machine's clock: when it wrote its final status."""
        proc = run_orch("deploy", "-c", cfg, "--json", *options, "--", "--epochs", "1")
        assert proc.returncode == 0, proc.stderr
        run_dir = Path(json.loads(proc.stdout)["run_dir"])
        wait_for(lambda: status(run_dir).get("state") == "finished", 120, "the run")
        return (run_dir / "status.json").stat().st_mtime

    deploy_and_finish("--autostop", "1")  # 60 s: the next deploy comes well inside it
    assert not marker.exists()
    second_end = deploy_and_finish()  # re-arms with deploy.yaml's 6 s
    wait_for(lambda: marker.exists() and marker.read_text().strip(), 60, "the autostop command")
    assert float(marker.read_text()) >= second_end + 6.0  # counted from the last run's end, not the first's
    assert "autostop: off" in run_orch("status", "-c", cfg).stdout  # it ran: the next deploy arms it again
    marker.unlink()
    off = run_orch("deploy", "-c", cfg, "--json", "--autostop", "off", "--", "--epochs", "1")
    assert off.returncode == 0 and json.loads(off.stdout)["autostop"]["armed"] is False
    time.sleep(8)
    assert not marker.exists()


def test_autostop_on_target_local_needs_an_explicit_command(tmp_path: Path, features: Path) -> None:
    cfg = write_config(tmp_path / "deploy.yaml", target="local", remote={"root": str(tmp_path / "remote")},
                       data={"remote_dir": str(features)})
    proc = run_orch("deploy", "-c", cfg, "--autostop", "5")
    assert proc.returncode == 2 and "would shut this computer down" in proc.stderr
    assert not (tmp_path / "remote").exists()


def test_down_asks_on_a_terminal(tmp_path: Path, sshd: Sshd, features: Path, moto_endpoint: str,
                                 aws_creds: None) -> None:
    iid = instance(moto_endpoint, f"asked-{tmp_path.name}")
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint})
    code, seen = on_a_terminal("down", "-c", cfg, question=f"Stop instance {iid}".encode(), answer=b"n\n")
    assert code == 130
    assert state_of(moto_endpoint, iid) == "running"  # declined: left running


def test_a_deploy_that_started_the_instance_and_failed_stops_it_again(tmp_path: Path, sshd: Sshd, features: Path,
                                                                      moto_endpoint: str, aws_creds: None) -> None:
    iid = instance(moto_endpoint, f"restop-{tmp_path.name}")
    ec2_client(moto_endpoint).stop_instances(InstanceIds=[iid])
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint})
    proc = run_orch("resume", "no-such-run", "-c", cfg)  # starts the instance, then finds no such run
    assert proc.returncode == 2 and "no run 'no-such-run'" in proc.stderr
    assert f"stopping instance {iid} again" in proc.stderr
    assert state_of(moto_endpoint, iid) == "stopped"
    bad = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint},
                 remote={"root": str(tmp_path / "remote"), "python": "/no/such/python"})
    assert run_orch("deploy", "-c", bad).returncode != 0
    assert state_of(moto_endpoint, iid) == "stopped"


def test_up_watches_an_armed_autostop_again_after_a_reboot(tmp_path: Path, sshd: Sshd, features: Path,
                                                          moto_endpoint: str, aws_creds: None) -> None:
    iid = instance(moto_endpoint, f"reboot-{tmp_path.name}")
    marker = tmp_path / "STOPPED"
    cfg = config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint},
                 autostop={"idle_minutes": 30, "command": f"touch {marker}"})
    out = json.loads(run_orch("deploy", "-c", cfg, "--json", "--", "--epochs", "1").stdout)
    wait_for(lambda: (tmp_path / "remote" / layout.WATCHER_STATE).exists(), 30, "the watcher")
    pid = json.loads((tmp_path / "remote" / layout.WATCHER_STATE).read_text())["pid"]
    os.kill(pid, 9)  # what a reboot does to it (its setting stays on disk)
    wait_for(lambda: "watcher is not running" in run_orch("status", "-c", cfg).stdout, 30, "status to notice")
    run_orch("down", "-c", cfg, "--force")
    assert run_orch("up", "-c", cfg).returncode == 0
    st = json.loads(run_orch("status", "-c", cfg, "--json").stdout)
    assert st["machine"]["autostop"]["armed"] and st["machine"]["autostop"]["watcher_alive"]
    assert out["autostop"]["idle_minutes"] == 30
    run_orch("deploy", "-c", cfg, "--autostop", "off", "--", "--epochs", "1")  # leave no watcher behind


def test_an_instance_started_by_a_command_that_fails_while_it_starts_is_stopped_again(
        tmp_path: Path, sshd: Sshd, features: Path, moto_endpoint: str, aws_creds: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The money rule holds before any connection too: a wait that fails (a timeout, Ctrl-C,
    no address) after the instance was started stops it again."""
    from orchestrator import ec2
    from orchestrator.config import load_config
    from orchestrator.context import Context, Output
    from orchestrator.errors import AwsError
    from orchestrator.provision import acquire

    iid = instance(moto_endpoint, f"halfway-{tmp_path.name}")
    ec2_client(moto_endpoint).stop_instances(InstanceIds=[iid])
    cfg = load_config(config(tmp_path, sshd, features, ec2={"instance_id": iid, "endpoint_url": moto_endpoint}))
    original = ec2.ensure_running

    def starts_then_fails(*args: object, **kwargs: object) -> object:
        original(*args, **kwargs)  # started for real
        raise AwsError("waiting for the instance: timed out")

    monkeypatch.setattr(ec2, "ensure_running", starts_then_fails)
    output = Output.captured()
    with pytest.raises(AwsError, match="timed out"), acquire(Context(cfg, output), start=True):
        pass
    assert state_of(moto_endpoint, iid) == "stopped"
    assert f"stopping instance {iid} again" in output.err.file.getvalue()
