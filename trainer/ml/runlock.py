"""One trainer per run directory: an flock on ``<run_dir>/lock``, held for the process's life.

The kernel drops an flock when its holder dies, however it dies, so a SIGKILLed trainer never
blocks the next one. The lock file holds the holder's pid, for the busy message only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from trainer.contract import layout
from trainer.machine.locks import open_lock, try_lock
from trainer.ml.errors import RunBusy, UsageError

_held: dict[Path, int] = {}  # run directory -> the open descriptor of its lock, held: never closed


def hold(run_dir: Path) -> None:
    """Take ``run_dir``'s lock (creating the folder) or raise RunBusy naming the holder's pid.

    Nothing else is written before the lock is ours: a loser leaves the run directory as it
    found it. The descriptor is close-on-exec, and worker processes are started with
    forkserver/spawn, so no child keeps the lock alive after its parent dies. Taking a lock this
    process holds already is a no-op."""
    if run_dir.resolve() in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_lock(run_dir / layout.RUN_LOCK)
    except OSError as exc:  # a file in the way, no permission, a read-only file system...
        raise UsageError(f"--run-dir {run_dir}: cannot use it as a run directory ({exc.strerror})") from exc
    if not try_lock(fd):
        holder = _holder(fd)
        os.close(fd)
        raise RunBusy(f"run directory {run_dir} is in use by another trainer (pid {holder}); "
                      "wait for it to end or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[run_dir.resolve()] = fd


def _holder(fd: int) -> str:
    """The pid the holder wrote; it writes it right after locking, so wait a moment for it."""
    for _ in range(50):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"
