"""A trainer that stops making progress looks stalled, not healthy: SIGSTOPped (named as such),
or alive with no sign of life for monitor.stall_seconds (a deadlock, a hung disk)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_orch, write_config
from tests.integration.trainer_proc import start_trainer, wait_for_epochs
from trainer.contract import layout
from trainer.machine.proc import pid_line
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow


def local_config(tmp_path: Path, root: Path, **monitor: object) -> Path:
    return write_config(tmp_path / "deploy.yaml", target="local", remote={"root": str(root), "python": sys.executable},
                        monitor=monitor)


def crafted_run(root: Path, quiet: float, stall_seconds: float | None) -> subprocess.Popen[bytes]:
    """A running trainer's folder whose process lives (a sleeper) but gave its last sign of life ``quiet`` s ago."""
    run = root / "runs" / "quiet"
    run.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    (run / layout.PID_FILE).write_text(pid_line(sleeper.pid))
    (run / layout.STATUS).write_text(json.dumps({"state": "running", "epoch": 3, "epochs": 10, "pid": sleeper.pid}))
    then = time.time() - quiet
    os.utime(run / layout.STATUS, (then, then))
    (run / layout.HEARTBEAT).write_text(json.dumps({"time": then, "pid": sleeper.pid, "median_epoch_seconds": 1.0}))
    if stall_seconds is not None:
        (run / layout.DEPLOY_JSON).write_text(json.dumps({"monitor": {"stall_seconds": stall_seconds}}))
    return sleeper


@pytest.mark.parametrize("quiet, stall_seconds, stalled", [(100, 10, True), (100, None, False), (700, None, True),
                                                           (5, 3600, False)])
def test_no_sign_of_life_for_longer_than_stall_seconds_is_stalled(tmp_path: Path, quiet: float,
                                                                 stall_seconds: float | None, stalled: bool) -> None:
    root = tmp_path / "root"
    sleeper = crafted_run(root, quiet, stall_seconds)
    try:
        cfg = local_config(tmp_path, root)
        runs = json.loads(run_orch("runs", "--json", "-c", cfg).stdout)
        assert runs[0]["state"] == ("stalled" if stalled else "running")
        view = run_orch("monitor", "quiet", "--json", "-c", cfg)
        doc = json.loads(view.stdout)
        assert view.returncode == 0 and (doc["stall"] is not None) == stalled
        if stalled:
            assert "no sign of life" in doc["stall"] and doc["state"] == "stalled"
            assert "STALLED" in run_orch("status", "-c", cfg).stdout
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_sigstopped_trainer_is_named_as_stopped_by_a_signal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synth(data, n=60, dim=8, seed=2, min_frames=4, max_frames=6)
    root = tmp_path / "root"
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    proc = start_trainer("train", "--data-dir", data, "--run-dir", run, "--epochs", "200", "--batch-size", "8",
                         "--hidden", "8", "--attention", "4", "--patience", "0", log=tmp_path / "train.log")
    try:
        wait_for_epochs(run, 1, proc)
        cfg = local_config(tmp_path, root, stall_seconds=600)
        doc = json.loads(run_orch("monitor", "r1", "--json", "-c", cfg).stdout)
        assert doc["state"] == "running" and doc["stall"] is None and doc["quiet_for"] < 60  # the heartbeat beats
        os.kill(proc.pid, signal.SIGSTOP)
        doc = json.loads(run_orch("monitor", "r1", "--json", "-c", cfg).stdout)
        assert doc["state"] == "stalled" and "stopped by a signal" in doc["stall"]
        assert "process stopped by a signal" in run_orch("monitor", "r1", "--once", "-c", cfg).stdout
        os.kill(proc.pid, signal.SIGCONT)
        doc = json.loads(run_orch("monitor", "r1", "--json", "-c", cfg).stdout)
        assert doc["state"] == "running" and doc["stall"] is None
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(60)
