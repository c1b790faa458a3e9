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
