"""Child processes (``ssh``, ``tar``) that must never outlive orch.

Two guards, because either alone leaves a gap:

- the kernel kills a child when orch dies, however it dies (SIGKILL included), through
  ``PR_SET_PDEATHSIG`` set between fork and exec. Linux ties that signal to the *thread*
  that forked the child: spawn from a thread that lives as long as the child is needed
  (every caller here waits for its child in the thread that spawned it);
- a :func:`scope` kills the children spawned inside it when it ends, so an interrupted
  command (Ctrl-C, SIGTERM turned into an interrupt) stops its transfers at once instead of
  waiting for them, or leaving them to run until orch exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from functools import cache
from typing import Any

_PR_SET_PDEATHSIG = 1
_live: ContextVar[set[subprocess.Popen[bytes]] | None] = ContextVar("orch_children", default=None)


@cache
def _prctl() -> Any:
    """libc's prctl, looked up once in the parent (never between fork and exec); None off Linux."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with(parent: int) -> Callable[[], None]:
    """The child's first act: ask for SIGKILL when the spawning thread ends."""
    prctl = _prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # orch died between fork and prctl: nobody would kill us later
            os._exit(1)

    return preexec


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kwargs)`` for a child that dies with orch (and with the
    innermost :func:`scope`, if any)."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, preexec_fn=_die_with(os.getpid()), **kwargs)
    live = _live.get()
    if live is not None:
        live.add(proc)
    return proc


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Children spawned in this block (in this thread) are killed and reaped when it ends,
    however it ends; on a normal end they have exited already."""
    live: set[subprocess.Popen[bytes]] = set()
    token = _live.set(live)
    try:
        yield
    finally:
        _live.reset(token)
        for proc in live:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class Tail:
    """The last ``limit`` bytes a child writes to a pipe (its stderr), read in a thread: the child
    never blocks on a full pipe, and a child that writes without end costs ``limit`` bytes."""

    def __init__(self, pipe: Any, limit: int = 64 << 10) -> None:
        import threading

        self.data, self.limit = bytearray(), limit
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe: Any) -> None:
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: os.read(pipe.fileno(), 1 << 16), b""):
                self.data += chunk
                if len(self.data) > 2 * self.limit:
                    del self.data[: -self.limit]

    def last_line(self, default: str) -> str:
        """The last non-empty line, once the pipe has closed (or ``default``)."""
        self.thread.join(timeout=10)
        lines = [ln for ln in self.data[-self.limit:].decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else default
