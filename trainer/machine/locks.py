"""flock, the one way the machine side locks: a lock dies with its holder, however it dies, so
a SIGKILLed holder blocks no one. Every lock file orch creates is 0600: only the machine user
orch logs in as can open it, so no other user can take (and hold) one of orch's locks."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

MODE = 0o600


def open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (created 0600; close-on-exec: no child inherits it)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, MODE)


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the flock on ``fd`` if it is free (exclusive, or ``shared``); never waits."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock(path: Path, *, shared: bool = False, wait: float | None = None,
         waiting: Callable[[], None] | None = None) -> int | None:
    """Take ``path``'s flock and return the descriptor that holds it (closing it lets go).
    ``wait``: seconds to wait for a holder (None: as long as it takes); ``waiting`` is called once
    when the lock is held by someone else. None when ``wait`` ran out."""
    fd = open_lock(path)
    if try_lock(fd, shared=shared):
        return fd
    if waiting is not None:
        waiting()
    if wait is None:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        return fd
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if try_lock(fd, shared=shared):
            return fd
    os.close(fd)
    return None


def is_locked(path: Path, *, shared_too: bool = False) -> bool:
    """Whether another process holds an exclusive flock on ``path`` (``shared_too``: any flock at
    all), without taking it for long. Opened read-only: looking never creates the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if shared_too else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
