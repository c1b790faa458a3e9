"""Run ``python -m trainer`` as a real process, the way orch launches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.contract import layout

ROOT = Path(__file__).resolve().parents[2]


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_trainer(*args: str | Path, check: bool = True, timeout: float = 300,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], capture_output=True,
                          text=True, env=trainer_env() | (env or {}), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer {args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_trainer(*args: str | Path, log: Path, env: dict[str, str] | None = None,
                  append: bool = False) -> subprocess.Popen[bytes]:
    """The trainer in the background, stdout and stderr into ``log``; ``env`` adds variables."""
    with open(log, "ab" if append else "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "trainer", *map(str, args)], stdout=fh,
                                stderr=subprocess.STDOUT, env=trainer_env() | (env or {}))


def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / layout.METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def status(run: Path) -> dict[str, Any]:
    return json.loads((run / layout.STATUS).read_text())


def wait_for_epochs(run: Path, n: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(metrics(run)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before epoch {n}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no epoch {n} within {timeout} s")
        time.sleep(0.05)


def signal_ended(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """``proc.communicate(timeout)`` after a signal was sent to it; on a hang, the failure says
    what the process does with signals (ignored, blocked, pending) and where each thread waits."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        where = _where_it_waits(proc.pid)
        proc.kill()
        proc.communicate()
        raise AssertionError(f"pid {proc.pid} did not end within {timeout:.0f} s of the signal:\n{where}") from None


def _where_it_waits(pid: int) -> str:
    lines = []
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        lines += [line for line in status if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            lines.append(f"thread {task.name} {(task / 'comm').read_text().strip()}: state {state}, "
                         f"waits in {(task / 'wchan').read_text().strip() or '-'}, "
                         f"syscall {(task / 'syscall').read_text().split()[0] if (task / 'syscall').is_file() else '?'}")
    except OSError as exc:
        lines.append(f"(/proc unreadable: {exc})")
    return "\n".join(lines)
