"""flock, the one way the machine side locks: a lock dies with its holder, however it dies, so
a SIGKILLed holder blocks no one. Every lock file orch creates is 0600: only the machine user
orch logs in as can open it, so no other user can take (and hold) one of orch's locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MODE = 0o600


def open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (created 0600; close-on-exec: no child inherits it)."""
    tighten(path)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, MODE)


def tighten(path: Path) -> bool:
    """A file of ours that others may open (an older orch made it 0644) is replaced by a fresh
    0600 one: a chmod would leave others the descriptors they opened meanwhile, and a lock held
    through one of those is on the old file now, where it holds back no one. Done only while no
    process of ours holds its lock, so the replacement never lets two of ours in at once."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not st.st_mode & 0o077 or st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
        return False
    if is_locked(path, shared_too=True) and not foreign_holders(path):
        return False  # one of ours holds it: the next opener, once it is free, tightens it
    fresh = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        os.close(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, MODE))
        os.replace(fresh, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(fresh)
        return False
    return True


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the flock on ``fd`` if it is free (exclusive, or ``shared``); never waits."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def held(path: Path, *, shared: bool = False) -> Iterator[None]:
    """``path``'s flock held for the block (waited for as long as it takes)."""
    fd = lock(path, shared=shared)
    assert fd is not None  # no wait limit: it always comes
    try:
        yield
    finally:
        os.close(fd)


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


def holders(path: Path) -> list[int] | None:
    """The pids holding an flock on ``path`` (/proc/locks), or None when the kernel does not say."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as fh:
            table = fh.read(1 << 20)
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
            pids.append(int(fields[4]))
    return pids


def process_uid(pid: int) -> int | None:
    """The real uid of a living process (/proc/PID/status: also right after it changed its uid)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


UNKNOWN = -1  # the uid of a holder whose process is gone (its descriptor lives on in a child it forked)


def foreign_holders(path: Path, uid: int | None = None) -> list[tuple[int, int]]:
    """The (pid, uid) of every holder of ``path``'s flock when all of them belong to another user
    than ``uid`` (default: this process's): a lock only they hold says nothing about orch's own
    work. [] when none holds it, when one of them is ours, or when the kernel does not say. A
    holder whose process is gone counts as another user's only where others could open the file."""
    me = os.getuid() if uid is None else uid
    try:
        loose = bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return []
    owners = []
    for pid in holders(path) or []:
        uid_of = process_uid(pid)
        if uid_of is not None:
            owners.append((pid, uid_of))
        elif loose:
            owners.append((pid, UNKNOWN))
    return owners if owners and all(owner != me for _, owner in owners) else []


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
