"""Day two: what a run's trainer tells the webhook when it continues after a recovery and when it
fails (a real HTTP server on 127.0.0.1 receives it; a dead one never changes how the run ends);
and housekeeping: `orch runs` newest first with --limit, `orch stop --all`, `orch rm` (asks, -y,
refuses an active run, --storage, hostile ids), run ids completed in the shell.

(The finished run's message, its retry and the URL's secrecy: test_deploy.py's local deploy.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import on_a_terminal, write_config
from tests.integration.trainer_proc import run_trainer, status
from tests.servers import WEBHOOK_SECRET, free_port, webhook_stand_in
from trainer.contract import layout
from trainer.contract.notify import Settings
from trainer.machine.proc import pid_line

pytestmark = pytest.mark.slow

# A trainer as far as orch can tell (pid file, status, SIGTERM -> stopped), without TensorFlow.
STAND_IN = textwrap.dedent("""
    import json, os, signal, sys, time
    def stop(*_):
        with open(sys.argv[1] + ".tmp", "w") as fh:
            json.dump({"state": "stopped", "epoch": 1, "epochs": 9, "pid": os.getpid()}, fh)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_recovered_run_and_a_failed_one_notify_and_a_dead_webhook_never_changes_how_a_run_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer as the launcher starts it (its settings file named in the environment); a run
    that fails at once (no data) needs no TensorFlow."""
    monkeypatch.setenv("ORCH_NOTIFY_BACKOFF", "0.05")
    empty = tmp_path / "empty"
    empty.mkdir()
    recovery = json.dumps({"at": "2026-12-01T10:00:00+00:00", "why": "EC2 took the spot instance",
                           "kind": "preempted", "old_instance": "i-0aaa", "new_instance": "i-0bbb"})
    with webhook_stand_in() as hook:
        for name, url in (("alive", hook.url), ("dead", f"http://127.0.0.1:{free_port()}/services/{WEBHOOK_SECRET}")):
            settings = tmp_path / f"{name}.json"
            settings.write_bytes(Settings(url, hourly_usd=2.0, host="i-0bbb").to_bytes())
            run = tmp_path / "runs" / name
            proc = run_trainer("train", "--data-dir", empty, "--run-dir", run, f"--record-recovery={recovery}",
                               check=False, env={"ORCH_NOTIFY_FILE": str(settings)})
            assert proc.returncode == 13, proc.stderr[-2000:]  # no data: the run's own exit code, whatever the webhook
            assert status(run)["state"] == "failed" and WEBHOOK_SECRET not in proc.stdout + proc.stderr
        assert proc.stdout.count("not delivered to http://127.0.0.1:") == 2, proc.stdout  # recovered, failed
        assert "after 3 tries" in proc.stdout and "the run is not affected" in proc.stdout
        recovered, failed = hook.wait("recovered")[0], hook.wait(layout.FAILED)[0]
    assert [msg["state"] for _path, msg, _code in hook.got] == ["recovered", "failed"]  # in the order they happened
    assert recovered["recovery"]["why"] == "EC2 took the spot instance" and recovered["recovery"]["epoch_restored"] == 0
    assert recovered["text"].startswith("orch: run alive recovered on i-0bbb (EC2 took the spot instance): "
                                        "continuing from epoch 0")
    assert failed["error"] == status(tmp_path / "runs" / "alive")["error"] and "no .npz/.npy" in failed["error"]
    assert failed["text"] == f"orch: run alive failed on i-0bbb at epoch 0 of 100: {failed['error']}; no epoch " \
                             "finished yet"  # no run.json yet, so no elapsed time, so no cost
    assert failed["hourly_usd"] == 2.0 and failed["elapsed_seconds"] is None and failed["cost_usd"] is None


def active_run(root: Path, run_id: str, age: float) -> subprocess.Popen[bytes]:
    """A run folder whose trainer lives (a stand-in), created ``age`` seconds ago."""
    run = root / layout.RUNS_DIR / run_id
    run.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN, str(run / layout.STATUS)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # its SIGTERM handler is set
    threading.Thread(target=proc.wait, daemon=True).start()  # reaped as it ends: a zombie is no trainer
    (run / layout.PID_FILE).write_text(pid_line(proc.pid))
    (run / layout.STATUS).write_text(json.dumps({"state": "running", "epoch": 1, "epochs": 9, "pid": proc.pid}))
    (run / layout.DEPLOY_JSON).write_text("{}")  # orch's creation mark
    (root / layout.NOTIFY_DIR).mkdir(exist_ok=True)
    (root / layout.NOTIFY_DIR / f"{run_id}.json").write_text("{}")  # its webhook settings (they go with it)
    os.utime(run / layout.DEPLOY_JSON, (time.time() - age, time.time() - age))
    return proc


@pytest.fixture
def bucket(moto_endpoint: str, aws_creds: None, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    import boto3

    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)
    name = f"rm-{os.getpid()}-{tmp_path.name.lower().replace('_', '-')}"[:63].rstrip("-")
    s3.create_bucket(Bucket=name)
    yield s3, name


def test_runs_newest_first_stop_all_rm_and_completion(tmp_path: Path, moto_endpoint: str,
                                                       bucket: tuple[Any, str]) -> None:
    from orchestrator.completion import run_ids
    from trainer.machine.remove import remove

    s3, name = bucket
    root = tmp_path / "remote"
    cfg = write_config(tmp_path / "deploy.yaml", target="local", remote={"root": str(root), "python": sys.executable},
                       storage={"s3_uri": f"s3://{name}/p", "endpoint_url": moto_endpoint, "region": "us-east-1"})
    stand_ins = [active_run(root, "older", 100), active_run(root, "newer", 10)]
    try:
        for run_id in ("older", "newer"):  # their mirrors
            for rel in (layout.STATE, layout.STATUS, layout.TRAIN_LOG):
                s3.put_object(Bucket=name, Key=f"p/runs/{run_id}/{rel}", Body=b"{}")

        def mirrored(run_id: str) -> list[str]:
            return [o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix=f"p/runs/{run_id}/").get("Contents", [])]

        assert "run older is active" in one_error(orch("rm", "older", "-y", "-c", cfg), 6)
        assert (root / layout.RUNS_DIR / "older").is_dir() and mirrored("older")
        # completion: no cache yet, so the (local, quick) machine is asked; then the cache answers
        assert run_ids(str(cfg)) == ["newer", "older"] and run_ids(str(cfg), "ol") == ["older"]

        stopped = orch("stop", "--all", "-c", cfg)
        assert stopped.returncode == 0 and sorted(stopped.stdout.splitlines()) == [
            "run newer stopped at epoch 1/9", "run older stopped at epoch 1/9"], stopped.stdout + stopped.stderr
        assert ok(orch("stop", "--all", "-c", cfg)).stdout.strip() == "no run is running; nothing to stop"
        listed = json.loads(ok(orch("runs", "--json", "-c", cfg)).stdout)
        assert [(r["run_id"], r["state"], r["where"]) for r in listed] == [("newer", "stopped", "both"),
                                                                           ("older", "stopped", "both")]
        limited = json.loads(ok(orch("runs", "--json", "--limit", "1", "-c", cfg)).stdout)
        assert [r["run_id"] for r in limited] == ["newer"]

        # hostile ids: refused before anything is asked, and by the machine itself
        for hostile in ("../x", "older/../../x", ".hidden"):
            assert "is not a run id" in one_error(orch("rm", hostile, "-y", "-c", cfg), 2)
        assert set(remove(root, ["../remote", "older/.."]).refused) == {"../remote", "older/.."}
        assert "without one, pass -y" in one_error(orch("rm", "older", "-c", cfg), 2)  # no terminal: no yes

        code, seen = on_a_terminal("rm", "old", "-c", cfg, question=b"Remove run older from localhost?",
                                   answer=b"y\n")
        assert code == 0 and b"removed run older from localhost" in seen, seen
        assert not (root / layout.RUNS_DIR / "older").exists() and mirrored("older")  # kept without --storage
        assert run_ids(str(cfg)) == ["newer"]  # rm keeps the completion cache right
        both = ok(orch("rm", "newer", "older", "--storage", "-y", "-c", cfg)).stdout.splitlines()
        assert both == ["removed run newer from localhost and its mirror (3 objects)",
                        "removed run older's mirror from storage (3 objects)"]
        assert not mirrored("newer") and not mirrored("older")
        assert os.listdir(root / layout.RUNS_DIR) == [] and os.listdir(root / layout.NOTIFY_DIR) == []

        # the machine is gone: --storage still removes a mirror
        s3.put_object(Bucket=name, Key=f"p/runs/gone/{layout.STATE}", Body=b"{}")
        away = write_config(tmp_path / "away.yaml", target="ssh", ssh={"host": "127.0.0.1", "port": free_port(),
                                                                        "connect_timeout": 2, "config_file": None},
                            storage={"s3_uri": f"s3://{name}/p", "endpoint_url": moto_endpoint, "region": "us-east-1"})
        gone = ok(orch("rm", "gone", "--storage", "-y", "-c", away))
        assert gone.stdout.strip() == "removed run gone's mirror from storage (1 object)" and not mirrored("gone")
        assert "the machine cannot be reached" in gone.stderr
    finally:
        for proc in stand_ins:
            proc.kill()


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def orch(*args: str | Path) -> Ran:
    """`orch ARGS...` in this process (no interpreter to start: these commands end with it)."""
    from orchestrator.cli import main
    from orchestrator.context import Output

    output = Output.captured(width=300)
    code = main([str(a) for a in args], output=output)
    return Ran(code, output.out.file.getvalue(), output.err.file.getvalue())


def ok(ran: Ran) -> Ran:
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    return ran


def one_error(ran: Ran, code: int) -> str:
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == code and len(lines) == 1 and lines[0].startswith("orch: error: "), ran.stderr
    return lines[0]
