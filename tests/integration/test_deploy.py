"""`orch deploy` against a real loopback sshd and moto's EC2 server, and on target local."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import boto3
import pytest

from tests.integration.conftest import Sshd, run_orch, write_config
from tests.integration.trainer_proc import metrics, status
from tests.servers import WEBHOOK_SECRET, WebhookStandIn, free_port, webhook_stand_in
from trainer.contract import layout
from trainer.machine import logfilter
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
TRAIN = {"epochs": 3, "batch_size": 16, "hidden": 32, "attention": 16, "seed": 1, "patience": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy-data")
    synth(root, n=160, dim=16, seed=5, min_frames=6, max_frames=12)
    return root


def ssh_config(tmp_path: Path, sshd: Sshd, data: Path, *, known: bool = True, target: str = "ssh",
               root: Path | None = None, **train: object) -> Path:
    known_hosts = tmp_path / "known_hosts"
    if known and not known_hosts.exists():
        known_hosts.write_text(sshd.known_hosts_line())
    return write_config(
        tmp_path / "deploy.yaml", target=target,
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(known_hosts), "connect_timeout": 5},
        remote={"root": str(root or tmp_path / "remote"), "python": os.sys.executable},
        data={"remote_dir": str(data)},
        train={**TRAIN, "cache_dir": str(tmp_path / "cache"), **train},
    )


def wait_final(run_dir: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(run_dir) if (run_dir / layout.STATUS).exists() else {}
        if st.get("state") in layout.FINAL_STATES:
            return st
        time.sleep(0.3)
    raise AssertionError(f"{run_dir} did not finish: {(run_dir / layout.TRAIN_LOG).read_text()[-2000:]}")


def deployed(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stop_run(run_dir: Path) -> None:
    pid = int((run_dir / layout.PID_FILE).read_text().split()[0])
    with contextlib.suppress(ProcessLookupError):  # ended already: the test's assertions judge that
        os.kill(pid, signal.SIGTERM)
    wait_final(run_dir)


def error_line(proc) -> str:
    """The one line an error gets: last on stderr, after any progress lines, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("orch: error:")] == lines[-1:], proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[-1]


def user() -> str:
    return os.environ.get("USER") or "root"


def test_deploy_over_ssh_trains_to_finished_after_the_session_ends(tmp_path: Path, sshd: Sshd, data: Path) -> None:
    cfg = ssh_config(tmp_path, sshd, data)
    out = deployed(run_orch("deploy", "-c", cfg, "--json", "--", "--epochs", "4"))
    assert out["host"] == f"127.0.0.1:{sshd.port}" and out["code_transferred"] is True
    run_dir = Path(out["run_dir"])
    assert run_dir == tmp_path / "remote" / "runs" / out["run_id"]
    # orch has exited (its SSH session is gone); the run goes on to the end.
    st = wait_final(run_dir)
    assert st["state"] == "finished" and [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3, 4]
    deploy_json = json.loads((run_dir / layout.DEPLOY_JSON).read_text())
    assert deploy_json["target"] == "ssh" and deploy_json["train"]["epochs"] == 3
    assert json.loads((run_dir / layout.RUN_JSON).read_text())["config"]["epochs"] == 4  # `--` wins

    again = deployed(run_orch("deploy", "-c", cfg, "--json"))
    assert again["code_transferred"] is False and again["code_version"] == out["code_version"]
    wait_final(Path(again["run_dir"]))


def test_a_second_deploy_while_running_is_refused(tmp_path: Path, sshd: Sshd, data: Path) -> None:
    cfg = ssh_config(tmp_path, sshd, data, epochs=500)
    first = deployed(run_orch("deploy", "-c", cfg, "--json", "--run-id", "long-one"))
    try:
        # orch returned as soon as the run started; the run goes on without it.
        assert status(Path(first["run_dir"]))["state"] == "running"
        second = run_orch("deploy", "-c", cfg)
        assert second.returncode == 6
        assert "run long-one is still running" in error_line(second) and "--force" in second.stderr
        forced = deployed(run_orch("deploy", "-c", cfg, "--json", "--force", "--", "--epochs", "1"))
        wait_final(Path(forced["run_dir"]))
    finally:
        stop_run(Path(first["run_dir"]))
    assert status(Path(first["run_dir"]))["state"] == "stopped"
    # A run id that exists is refused too.
    again = run_orch("deploy", "-c", cfg, "--run-id", "long-one")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_unknown_host_key_is_refused_and_trust_accepts_it(tmp_path: Path, sshd: Sshd, data: Path) -> None:
    cfg = ssh_config(tmp_path, sshd, data, known=False)
    proc = run_orch("deploy", "-c", cfg)
    assert proc.returncode == 5
    assert sshd.host_fingerprint in proc.stderr and "orch trust" in proc.stderr and "--trust-new-host" in proc.stderr
    assert not (tmp_path / "known_hosts").exists()
    trusted = run_orch("trust", "-c", cfg)
    assert trusted.returncode == 0, trusted.stderr
    assert f"trusted 127.0.0.1:{sshd.port}: ssh-ed25519 {sshd.host_fingerprint}" in trusted.stdout  # shown
    assert "already trusted" in run_orch("trust", "-c", cfg).stdout
    assert (tmp_path / "known_hosts").read_text().split()[1:] == sshd.known_hosts_line().split()[1:]
    # Now known: a deploy goes through without any flag.
    wait_final(Path(deployed(run_orch("deploy", "-c", cfg, "--json"))["run_dir"]))


def test_a_changed_host_key_is_always_refused(tmp_path: Path, sshd: Sshd, data: Path) -> None:
    from tests.integration.conftest import keygen

    other = keygen(tmp_path / "other_key").split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    cfg = ssh_config(tmp_path, sshd, data, known=False)
    for extra in ([], ["--trust-new-host"]):
        proc = run_orch("deploy", "-c", cfg, *extra)
        assert proc.returncode == 5 and "CHANGED" in proc.stderr and "refusing" in proc.stderr
    assert not (tmp_path / "remote").exists()


def test_shell_metacharacters_cannot_run_commands(tmp_path: Path, sshd: Sshd, data: Path) -> None:
    marker = tmp_path / "PWNED"
    evil_root = tmp_path / f"r o'ot;touch {marker};$(touch {marker})`touch {marker}`"
    cfg = ssh_config(tmp_path, sshd, data, root=evil_root)
    out = deployed(run_orch("deploy", "-c", cfg, "--json"))
    assert Path(out["run_dir"]).parent.parent == evil_root  # the odd folder is used as a name
    wait_final(Path(out["run_dir"]))
    bad_id = run_orch("deploy", "-c", cfg, "--run-id", f"x;touch {marker}")
    assert bad_id.returncode == 2 and "run id" in bad_id.stderr
    bad_opt = run_orch("deploy", "-c", cfg, "--", "--classes", f"happy;touch {marker}")
    assert bad_opt.returncode == 2 and "unknown class" in bad_opt.stderr  # refused before launching
    assert not marker.exists()


def test_deploy_on_target_local_needs_no_ssh(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """... and the machine tells deploy.yaml's notify: webhook how the run ended (a real HTTP
    server on 127.0.0.1 answers its first try 500), never showing the URL's secret."""
    # A stray trainer/ package where the machine's commands start (the login's home on a real
    # box, the config's folder here) must not stand in for the shipped code.
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("")
    (tmp_path / "trainer" / "launch.py").write_text("raise SystemExit('a decoy ran')\n")
    (tmp_path / "trainer" / "watcher.py").write_text("raise SystemExit('a decoy ran')\n")
    monkeypatch.setenv("ORCH_NOTIFY_BACKOFF", "0.05")  # a retry waits 50 ms, not a second
    with webhook_stand_in(answers=[500]) as hook:
        cfg = write_config(tmp_path / "deploy.yaml", target="local", remote={"root": "remote"},
                           data={"remote_dir": str(data)}, train={**TRAIN, "cache_dir": str(tmp_path / "cache")},
                           ssh={"host": "no-such-host.invalid", "port": 1}, notify={"webhook": hook.url})
        out = deployed(run_orch("deploy", "-c", cfg, "--json", cwd=tmp_path / ".."))
        assert out["host"] == "localhost"
        run_dir = Path(out["run_dir"])
        assert run_dir.parent.parent == (tmp_path / "remote").resolve()  # relative to the config file
        assert wait_final(run_dir)["state"] == "finished"
        told_and_kept_secret(hook, run_dir, cfg)
        assert deployed(run_orch("deploy", "-c", cfg, "--json"))["code_transferred"] is False
        # train.log: the raw log's lines (read after it), stamped, TensorFlow's start-up noise left out
        log = (run_dir / layout.TRAIN_LOG).read_text().splitlines()
        raw = (run_dir / layout.RAW_LOG).read_bytes().splitlines(keepends=True)
        noise = logfilter.noise_pattern(logfilter.has_gpu())
        kept = [line.decode().rstrip("\n") for line in raw if not noise.match(line)]
        assert [line[21:] for line in log] == kept[:len(log)] and any("[trainer]" in line for line in log)
        assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in log)


def told_and_kept_secret(hook: WebhookStandIn, run_dir: Path, cfg: Path) -> None:
    """The finished run's message (sent again after the 500), and the URL's secret in a 0600
    file of its own, in no run file, log or output; `orch notify test` goes the same way."""
    run_id, final = run_dir.name, status(run_dir)
    [told] = hook.wait("finished")
    path = f"/services/T0/{WEBHOOK_SECRET}"
    assert hook.got == [(path, told, 500), (path, told, 200)]  # the same message, tried again
    assert {k: told[k] for k in ("run_id", "state", "epoch", "epochs", "best_val_accuracy", "best_epoch",
                                 "hourly_usd", "cost_usd")} == {
        "run_id": run_id, "state": "finished", "epoch": 3, "epochs": 3, "best_val_accuracy": final["best_val_accuracy"],
        "best_epoch": final["best_epoch"], "hourly_usd": None, "cost_usd": None}  # no price for this computer
    assert told["elapsed_seconds"] > 0 and "\n" not in told["text"]
    assert told["text"].startswith(f"orch: run {run_id} finished on localhost after 3 of 3 epochs: best val_accuracy "
                                   f"{final['best_val_accuracy']:.4f} at epoch {final['best_epoch']} (")
    pid = int((run_dir / layout.PID_FILE).read_text().split()[0])
    while Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] \
            not in "ZX":  # the trainer has logged what it did and exited
        time.sleep(0.1)
    where = hook.url.rsplit("/services/", 1)[0] + "/..."  # http://127.0.0.1:PORT/...: scheme and host only
    assert f"notify: finished sent to {where} (HTTP 200)" in (run_dir / layout.TRAIN_LOG).read_text()
    settings = run_dir.parent.parent / layout.NOTIFY_DIR / f"{run_id}.json"
    assert stat.S_IMODE(settings.stat().st_mode) == 0o600 and stat.S_IMODE(settings.parent.stat().st_mode) == 0o700
    shown = [run_orch(*command, "-c", cfg) for command in (["status"], ["status", "--json"], ["runs", "--json"],
                                                            ["config", "check"], ["logs", run_id])]
    assert json.loads(shown[3].stdout)["notify"]["webhook"] == where
    for name, text in [*((p.name, p.read_text(errors="replace")) for p in run_dir.rglob("*") if p.is_file()),
                       *((" ".join(p.args[3:5]), p.stdout + p.stderr) for p in shown)]:
        assert WEBHOOK_SECRET.split("/")[1] not in text, name
    tested = run_orch("notify", "test", "-c", cfg)
    assert tested.returncode == 0 and tested.stdout.strip() == f"test message delivered to {where}: HTTP 200"
    [probe] = hook.wait("test")
    assert probe["text"].startswith("orch: test message from localhost: this webhook gets the runs' finished, ")
    dead = write_config(cfg.with_name("dead.yaml"), target="local", remote={"root": str(run_dir.parent.parent)},
                        notify={"webhook": f"http://127.0.0.1:{free_port()}/hooks/{WEBHOOK_SECRET}"})
    refused = run_orch("notify", "test", "-c", dead)
    assert refused.returncode == 7 and "did not reach http://127.0.0.1:" in error_line(refused)
    assert "after 3 tries" in refused.stderr and WEBHOOK_SECRET not in refused.stderr


# ---------------------------------------------------------------------------- EC2 (moto)


def ec2_instance(endpoint: str, name: str, **kwargs) -> str:
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=endpoint)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    inst = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="g5.xlarge",
                             TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}],
                             **kwargs)["Instances"][0]
    return inst["InstanceId"]


def ec2_config(tmp_path: Path, sshd: Sshd, data: Path, endpoint: str, *, known: bool, **ec2: object) -> Path:
    cfg = ssh_config(tmp_path, sshd, data, known=known, target="ec2")
    doc = json.loads(json.dumps(__import__("yaml").safe_load(cfg.read_text())))
    doc["ec2"] = {"region": "us-east-1", "endpoint_url": endpoint, **ec2}
    return write_config(cfg, **doc)


def test_deploy_on_ec2_accepts_the_host_key_printed_on_the_console(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None, console_fingerprints) -> None:
    name = f"gpu-{tmp_path.name}"
    instance = ec2_instance(moto_endpoint, name)
    boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint).stop_instances(InstanceIds=[instance])
    cfg = ec2_config(tmp_path, sshd, data, moto_endpoint, known=False, name=name)

    console_fingerprints("SHA256:" + "A" * 43)  # some other key's fingerprint
    refused = run_orch("deploy", "-c", cfg)
    assert refused.returncode == 5 and "matches none of the fingerprints" in refused.stderr

    console_fingerprints(sshd.host_fingerprint)
    out = deployed(run_orch("deploy", "-c", cfg, "--json"))
    state = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint).describe_instances(
        InstanceIds=[instance])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "running"  # it was stopped: deploy started it
    assert sshd.host_key_pub.split()[1] in (tmp_path / "known_hosts").read_text()
    assert wait_final(Path(out["run_dir"]))["state"] == "finished"


def test_up_and_down(tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None) -> None:
    instance = ec2_instance(moto_endpoint, f"updown-{tmp_path.name}")
    cfg = ec2_config(tmp_path, sshd, data, moto_endpoint, known=True, instance_id=instance)
    down = run_orch("down", "-c", cfg)
    assert down.returncode == 0 and f"{instance} stopped" in down.stdout
    no_start = ec2_config(tmp_path, sshd, data, moto_endpoint, known=True, instance_id=instance, start_if_stopped=False)
    refused = run_orch("deploy", "-c", no_start)
    assert refused.returncode == 11 and "is stopped; `orch up` starts it" in refused.stderr
    up = run_orch("up", "-c", cfg)
    assert up.returncode == 0 and f"{instance} running" in up.stdout


def test_ec2_problems_get_one_clear_line(tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str,
                                        aws_creds: None, monkeypatch: pytest.MonkeyPatch) -> None:
    twin = f"twin-{tmp_path.name}"
    ec2_instance(moto_endpoint, twin)
    ec2_instance(moto_endpoint, twin)
    gone = ec2_instance(moto_endpoint, f"gone-{tmp_path.name}")
    boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint).terminate_instances(InstanceIds=[gone])
    cases = {
        "no instance with Name=nobody": {"name": "nobody"},
        "no such instance": {"instance_id": "i-0123456789abcdef0"},
        f"2 instances are named '{twin}'": {"name": twin},
        "is terminated": {"instance_id": gone},
    }
    for expected, ec2 in cases.items():
        proc = run_orch("deploy", "-c", ec2_config(tmp_path, sshd, data, moto_endpoint, known=True, **ec2))
        assert proc.returncode == 3 and expected in error_line(proc), proc.stderr
    # No public address and no ssh.host override.
    cfg = ec2_config(tmp_path, sshd, data, moto_endpoint, known=True, instance_id=gone)
    doc = __import__("yaml").safe_load(cfg.read_text())
    no_ip = ec2_instance(moto_endpoint, f"private-{tmp_path.name}", NetworkInterfaces=[
        {"DeviceIndex": 0, "AssociatePublicIpAddress": False,
         "SubnetId": boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint)
         .describe_subnets()["Subnets"][0]["SubnetId"]}])
    doc["ec2"]["instance_id"] = no_ip
    doc["ssh"]["host"] = None
    proc = run_orch("deploy", "-c", write_config(cfg, **doc))
    assert proc.returncode == 3 and "has no public address" in proc.stderr, proc.stderr
    # No credentials at all.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    proc = run_orch("deploy", "-c", ec2_config(tmp_path, sshd, data, moto_endpoint, known=True, name=twin))
    assert proc.returncode == 3 and "no AWS credentials found" in proc.stderr
