"""The day a user lives, against moto's EC2 and the real loopback sshd, in order:
deploy -> monitor --once --json while training -> monitor to the end (surviving a killed
SSH connection) -> download --best -> resume -> stop -> runs. Plus died / --continue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from tests.integration.conftest import Sshd, run_orch, write_config
from tests.integration.trainer_proc import metrics, status, trainer_env
from trainer.contract import layout
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory, sshd: Sshd, moto_endpoint: str) -> dict:
    work = tmp_path_factory.mktemp("day")
    synth(work / "features", n=360, dim=24, seed=3, min_frames=8, max_frames=24)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "day-gpu"}]}])
    (work / "known_hosts").write_text(sshd.known_hosts_line())
    cfg = write_config(
        work / "deploy.yaml", target="ec2",
        ec2={"region": "us-east-1", "name": "day-gpu", "endpoint_url": moto_endpoint},
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(work / "known_hosts")},
        remote={"root": str(work / "remote"), "python": sys.executable},
        data={"remote_dir": "data", "local_dir": "features"},
        train={"epochs": 60, "learning_rate": 0.003, "warmup_epochs": 1, "batch_size": 16, "hidden": 32,
               "attention": 16, "seed": 1, "patience": 0, "cache_dir": str(work / "cache")})
    return {"work": work, "cfg": cfg, "env": env}


def orch(day: dict, command: str, *args: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    """`orch COMMAND -c <the day's config> ARGS...` (-c before any `--`)."""
    os.environ.update(day["env"])
    return run_orch(command, "-c", day["cfg"], *args, **kw)


def ok_json(proc: subprocess.CompletedProcess[str]) -> dict | list:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def sshd_session_pids(sshd: Sshd) -> list[int]:
    """The per-connection sshd processes (children of the listening one)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == sshd.proc.pid:
            pids.append(int(stat.parent.name))
    return pids


def test_the_whole_day(day: dict, sshd: Sshd) -> None:
    work = day["work"]
    # deploy (with the data) -> the run starts
    first = ok_json(orch(day, "deploy", "--sync-data", "--json", "--run-id", "first"))
    assert first["data"]["files"] == 361
    run_dir = Path(first["run_dir"])

    # monitor --once --json while training: alive, epochs advancing
    snaps = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        snap = ok_json(orch(day, "monitor", "--once", "--json"))
        if snap["state"] == "running" and snap["epoch"]:
            snaps.append(snap)
        if len({s["epoch"] for s in snaps}) >= 2 or snap["state"] == "finished":
            break
        time.sleep(0.3)
    assert len({s["epoch"] for s in snaps}) >= 2, "no two snapshots at different epochs"
    assert all(s["alive"] and s["run_id"] == "first" for s in snaps)
    assert snaps[-1]["gpus"] == [] and "loadavg" in snaps[-1]["load"] and snaps[-1]["log_tail"]

    # monitor until the end, while its SSH connection is killed under it. The trainer is paused
    # (SIGSTOP) until the kill: the run outlasts it for sure (its 60 epochs once ended first).
    trainer_pid = int((run_dir / layout.PID_FILE).read_text().split()[0])
    os.kill(trainer_pid, signal.SIGSTOP)
    mon = subprocess.Popen([sys.executable, "-m", "orchestrator", "monitor", "first", "-c", str(day["cfg"]),
                            "--interval", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=trainer_env() | day["env"])
    killed: list[int] = []
    deadline = time.monotonic() + 30
    while not killed and mon.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = sshd_session_pids(sshd)
        if seen:  # monitor's connection: let it finish its handshake and refresh a few times
            time.sleep(1.5)
            killed = [pid for pid in sshd_session_pids(sshd) if pid in seen]
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    os.kill(trainer_pid, signal.SIGCONT)
    out, err = mon.communicate(timeout=240)
    assert killed, "monitor had no SSH connection to kill"
    assert mon.returncode == 0, err
    assert "reconnecting" in err
    assert "run first finished at epoch 60/60" in out
    parent = status(run_dir)
    assert parent["state"] == "finished"

    # download --best: verified files; a corrupted remote file is refused and not left behind
    victim = run_dir / "stats" / layout.CLASSES_JSON
    good = victim.read_bytes()
    victim.write_bytes(good.replace(b"neutral", b"NEUTRAL"))
    bad = orch(day, "download", "--best", "--dest", work / "artifacts")
    assert bad.returncode == 7 and "stats/classes.json: checksum mismatch" in bad.stderr
    assert not (work / "artifacts" / "first" / "stats" / layout.CLASSES_JSON).exists()
    assert not list((work / "artifacts").rglob("*.part-*"))
    victim.write_bytes(good)
    got = ok_json(orch(day, "download", "--best", "--dest", work / "artifacts", "--json"))
    assert got["run_id"] == "first" and got["best_val_accuracy"] == parent["best_val_accuracy"]
    assert "stats/classes.json" in got["fetched"] and len(got["fetched"]) + len(got["already_there"]) >= 10
    assert set(layout.TENSORBOARD_FILES) <= set(got["fetched"]) | set(got["already_there"])  # TensorBoard's too
    check = subprocess.run(["sha256sum", "-c", str(run_dir / layout.MANIFEST)], cwd=work / "artifacts" / "first",
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    again = ok_json(orch(day, "download", "--best", "--dest", work / "artifacts", "--json"))
    assert again["fetched"] == []  # everything is there and correct

    # resume: a new run whose parent is the best run, half its learning rate, from its level
    child = ok_json(orch(day, "resume", "--epochs", "2", "--json"))
    assert child["parent"] == "first"
    child_dir = Path(child["run_dir"])
    assert ok_json(orch(day, "monitor", child["run_id"], "--once", "--json"))["run_id"] == child["run_id"]
    assert orch(day, "monitor", child["run_id"], "--interval", "0.3").returncode == 0
    cfg = json.loads((child_dir / layout.RUN_JSON).read_text())
    assert cfg["parent_run"] == "first"
    assert cfg["config"]["learning_rate"] == pytest.approx(0.0015) and cfg["config"]["warmup_epochs"] == 1
    assert metrics(child_dir)[0]["val_accuracy"] >= parent["best_val_accuracy"] - 0.1

    # stop: a long run, stopped, reported
    long = ok_json(orch(day, "deploy", "--json", "--run-id", "long", "--", "--epochs", "500"))
    while not metrics(Path(long["run_dir"])):
        time.sleep(0.2)
    stopped = orch(day, "stop")
    assert stopped.returncode == 0 and "run long stopped at epoch" in stopped.stdout

    # runs lists all three, newest first
    runs = ok_json(orch(day, "runs", "--json"))
    assert [(r["run_id"], r["state"], r["parent"]) for r in runs] == [
        ("long", "stopped", None), (child["run_id"], "finished", "first"), ("first", "finished", None)]
    table = orch(day, "runs")
    assert table.returncode == 0 and "first" in table.stdout and "stopped" in table.stdout
    st = ok_json(orch(day, "status", "--json"))
    assert st["instance"]["state"] == "running" and st["machine"]["host"]["gpus"] == []
    assert not [r for r in st["machine"]["runs"] if r["alive"]] and st["machine"]["autostop"]["armed"] is False
    assert "[trainer] finished" in orch(day, "logs", "first").stdout


def test_a_died_run_is_shown_and_continues_in_place(day: dict) -> None:
    run = ok_json(orch(day, "deploy", "--json", "--sync-data", "--run-id", "victim", "--force", "--", "--epochs", "8"))
    run_dir = Path(run["run_dir"])
    while len(metrics(run_dir)) < 2:
        time.sleep(0.1)
    os.kill(int((run_dir / layout.PID_FILE).read_text().split()[0]), signal.SIGKILL)
    time.sleep(0.5)
    died = orch(day, "monitor", "victim", "--once", "--json")
    assert died.returncode == 10 and json.loads(died.stdout)["state"] == "died"
    assert orch(day, "resume", "victim").returncode == 2  # not finished: cannot be extended
    cont = ok_json(orch(day, "resume", "victim", "--continue", "--json"))
    assert cont["run_id"] == "victim" and cont["pid"] != run["pid"]
    final = orch(day, "monitor", "victim", "--interval", "0.3")
    assert final.returncode == 0, final.stderr
    assert [m["epoch"] for m in metrics(run_dir)] == list(range(1, 9))
    assert "continuing from epoch" in (run_dir / layout.TRAIN_LOG).read_text()
