"""Two launches at the same moment: exactly one wins, the other gets the busy error (exit 6).
Over the real loopback sshd, with real `orch` processes started together."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Sshd, write_config
from tests.integration.trainer_proc import metrics, trainer_env
from trainer.contract import layout
from trainer.machine.proc import pid_alive
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
TINY = {"batch_size": 16, "hidden": 16, "attention": 8, "seed": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("race-data")
    synth(root, n=120, dim=8, seed=4, min_frames=4, max_frames=8)
    return root


def config(tmp_path: Path, sshd: Sshd, data: Path, name: str, setup: str | None = None, **train: object) -> Path:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    return write_config(
        tmp_path / f"{name}.yaml", target="ssh",
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(known_hosts)},
        remote={"root": str(tmp_path / name), "python": sys.executable, "setup": setup},
        data={"remote_dir": str(data)}, train={**TINY, "cache_dir": str(tmp_path / "cache"), **train})


def together(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Start several `orch` processes at the same moment; wait for all."""
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator", *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=trainer_env()) for a in argvs]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


def stop_all(root: Path) -> None:
    for pid_file in root.glob(f"{layout.RUNS_DIR}/*/{layout.PID_FILE}"):
        pid, alive = pid_alive(pid_file)
        if alive and pid:
            os.kill(pid, signal.SIGKILL)


def trainers_of(run_dir: Path) -> list[int]:
    """Live `trainer train` processes whose --run-dir is this run."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer" in argv and b"train" in argv and str(run_dir).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


@pytest.mark.parametrize("attempt", range(3))
def test_two_deploys_at_the_same_moment_launch_exactly_one(tmp_path: Path, sshd: Sshd, data: Path,
                                                           attempt: int) -> None:
    trace = tmp_path / "setup-trace"
    # remote.setup (once per code version) takes a while: two deploys at once run it once
    cfg = config(tmp_path, sshd, data, "root", setup=f"echo start >> {trace}; sleep 2; echo end >> {trace}",
                 epochs=500)
    try:
        results = together(["deploy", "-c", str(cfg), "--json"], ["deploy", "-c", str(cfg), "--json"])
        assert trace.read_text() == "start\nend\n"
        codes = sorted(r.returncode for r in results)
        assert codes == [0, 6], [r.stderr for r in results]
        loser = next(r for r in results if r.returncode == 6)
        assert "is still running" in loser.stderr and loser.stderr.count("orch: error:") == 1
        runs = [d for d in (tmp_path / "root" / layout.RUNS_DIR).iterdir()]
        assert len(runs) == 1  # the loser created nothing
        assert len(trainers_of(runs[0])) == 1
    finally:
        stop_all(tmp_path / "root")


def test_two_continues_at_once_run_one_trainer(tmp_path: Path, sshd: Sshd, data: Path) -> None:
    cfg = config(tmp_path, sshd, data, "root", epochs=500)
    first = subprocess.run([sys.executable, "-m", "orchestrator", "deploy", "-c", str(cfg), "--json", "--run-id",
                            "victim"], capture_output=True, text=True, env=trainer_env())
    assert first.returncode == 0, first.stderr
    run_dir = Path(json.loads(first.stdout)["run_dir"])
    try:
        while not metrics(run_dir):
            time.sleep(0.1)
        stop_all(tmp_path / "root")  # SIGKILL: the run died
        time.sleep(0.3)
        results = together(["resume", "victim", "--continue", "-c", str(cfg)],
                           ["resume", "victim", "--continue", "-c", str(cfg)])
        assert sorted(r.returncode for r in results) == [0, 6], [r.stderr for r in results]
        time.sleep(2)  # both would have started by now
        assert len(trainers_of(run_dir)) == 1
    finally:
        stop_all(tmp_path / "root")
