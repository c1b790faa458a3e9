"""`orch monitor`'s snapshots come from ONE long-lived command on the machine (the
``snapshots`` verb), on the local target and over a real sshd: a killed one is started again
and the monitor goes on; it never outlives the monitor, whether the monitor ends or is killed."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Sshd, write_config
from tests.integration.trainer_proc import trainer_env
from tests.servers import processes_with
from trainer.contract import layout
from trainer.machine.proc import pid_line

WAIT = 120  # a safety net for a hang, not a margin: every wait ends on its event


class Monitor:
    """`orch monitor RUN` on a terminal of its own (a pty: it draws a frame per refresh, so a
    frame on the screen says a snapshot was answered), the screen read as it comes."""

    def __init__(self, cfg: Path, run_id: str) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "monitor", run_id, "-c", str(cfg),
                                      "--interval", "0.2"], stdin=slave, stdout=slave, stderr=slave,
                                     env=trainer_env())
        os.close(slave)
        self.master, self.screen, self.closed = master, b"", False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # the terminal closed with the process
                chunk = b""
            with self.changed:
                self.screen += chunk
                self.closed = not chunk
                self.changed.notify_all()
            if not chunk:
                os.close(self.master)
                return

    def shows(self, text: str) -> None:
        """Wait until the screen shows ``text``."""
        with self.changed:
            self.changed.wait_for(lambda: text.encode() in self.screen or self.closed, timeout=WAIT)
            assert text.encode() in self.screen, self.screen[-3000:].decode(errors="replace")


def running_run(root: Path, run_id: str, trainer: subprocess.Popen[bytes]) -> Path:
    """A run whose 'trainer' is ``trainer`` (a sleeping process), at epoch 1 of 3."""
    run = root / layout.RUNS_DIR / run_id
    run.mkdir(parents=True)
    (run / layout.PID_FILE).write_text(pid_line(trainer.pid))
    (run / layout.STATUS).write_text(json.dumps({"state": "running", "epoch": 1, "epochs": 3, "pid": trainer.pid}))
    (run / layout.METRICS).write_text(json.dumps({"epoch": 1, "val_accuracy": 0.5, "seconds": 1.0}) + "\n")
    return run


def commands(run: Path) -> list[int]:
    """The machine-side snapshots commands of ``run`` (living processes)."""
    return processes_with("snapshots", str(run))


def until_none_of(run: Path) -> None:
    deadline = time.monotonic() + WAIT
    while commands(run):
        assert time.monotonic() < deadline, f"a snapshots command of {run.name} outlived its monitor"
        time.sleep(0.05)


@pytest.mark.parametrize("target", ["local", "ssh"])
def test_one_snapshots_command_per_monitor_and_none_outlives_it(tmp_path: Path, sshd: Sshd, target: str) -> None:
    root = tmp_path / "remote"
    remote = {"root": str(root), "python": sys.executable}
    if target == "ssh":
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line())
        ssh = {"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
               "key_file": str(sshd.client_key), "known_hosts": str(known)}
        cfg = write_config(tmp_path / "deploy.yaml", target="ssh", ssh=ssh, remote=remote)
    else:
        cfg = write_config(tmp_path / "deploy.yaml", target="local", remote=remote)
    trainers = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        ends, killed = running_run(root, "ends", trainers[0]), running_run(root, "killed", trainers[1])

        # Its command is killed under the monitor (after an answer: a frame is drawn): the
        # next refresh starts another, and the monitor goes on to the run's end.
        mon = Monitor(cfg, "ends")
        mon.shows("epoch 1/3")
        [first] = commands(ends)
        os.kill(first, signal.SIGKILL)
        (ends / layout.STATUS).write_text(json.dumps({"state": "finished", "epoch": 3, "epochs": 3}))
        trainers[0].kill()
        trainers[0].wait()
        mon.shows("run ends finished at epoch 3/3")  # answered by a command started after the kill
        assert mon.proc.wait(timeout=WAIT) == 0
        assert commands(ends) == []  # its command ended with it

        # A monitor killed (SIGKILL: nothing of it runs any more) leaves no command behind either.
        mon = Monitor(cfg, "killed")
        mon.shows("epoch 1/3")
        assert len(commands(killed)) == 1
        mon.proc.kill()
        mon.proc.wait()
        until_none_of(killed)
    finally:
        for trainer in trainers:
            trainer.kill()
            trainer.wait()
