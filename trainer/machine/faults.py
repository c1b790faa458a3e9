"""Failpoints: the fault-injection tests' way to stop the trainer between two file operations.

``point(name)`` marks a moment of the commit sequence, of the repair or of training. With
``ORCH_TRAINER_KILL_AT=<name>@<n>`` in the environment, the process SIGKILLs itself the n-th
time it reaches that point (no clean-up, no atexit: exactly what a kill -9 or a power cut
does); with ``ORCH_TRAINER_FULL_AT=<name>@<n>`` it raises ENOSPC there instead (a full disk,
for machines where a test cannot mount a small filesystem); with
``ORCH_TRAINER_SIGNAL_AT=<name>@<n>`` it sends itself SIGTERM there and goes on (``orch stop``
at exactly that moment); with ``ORCH_TRAINER_POINTS_LOG=<file>`` it appends each point's name
to that file as it is reached (the fault harness plans its kills from an uninterrupted run's
list). Without the variables a point costs one comparison. Pure Python.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "ORCH_TRAINER_KILL_AT"
FULL_ENV = "ORCH_TRAINER_FULL_AT"
SIGNAL_ENV = "ORCH_TRAINER_SIGNAL_AT"
LOG_ENV = "ORCH_TRAINER_POINTS_LOG"

# Every point, in the order a run reaches them (tests check this list against the code).
POINTS = (
    # start-up repair, before training (then the publish points below, once)
    "repair:begin", "repair:temp-removed",
    # training: after each training batch, and as each epoch's validation begins
    "train:batch", "validate:begin",
    # the commit of one epoch (or of a position inside one): weights under a new name, then the state file
    "commit:begin", "weights:temp", "weights:synced", "weights:renamed", "state:temp", "commit:done",
    # publishing what derives from the state
    "manifest:temp", "publish:unlisted", "metrics:temp", "publish:metrics", "status:temp",
    "publish:status", "best:temp", "publish:best", "publish:listed", "publish:deleted",
    # the end of a run: evaluation written, the final publish follows
    "finish:evaluated",
)
# The storage mirror's (its own thread, only with --mirror-uri): after each object upload, each
# manifest rewrite, the state upload, each deletion of an object the state no longer names.
MIRROR_POINTS = ("mirror:uploaded", "mirror:manifest", "mirror:state", "mirror:deleted")


def parse(spec: str, env: str = ENV) -> tuple[str, int] | None:
    """``"<point>@<n>"`` -> (point, n); None for an empty spec; ValueError for a bad one."""
    if not spec:
        return None
    name, sep, count = spec.rpartition("@")
    if not sep or name not in POINTS + MIRROR_POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{env}={spec!r}: expected <point>@<n> with n >= 1 and a point of {', '.join(POINTS)}")
    return name, int(count)


_KILL = parse(os.environ.get(ENV, ""))
_FULL = parse(os.environ.get(FULL_ENV, ""), FULL_ENV)
_SIGNAL = parse(os.environ.get(SIGNAL_ENV, ""), SIGNAL_ENV)
_LOG = os.environ.get(LOG_ENV) or None
_reached: dict[str, int] = {}


def point(name: str) -> None:
    """Die by SIGKILL, fail as a full disk, or be sent SIGTERM here if the environment asks for it."""
    if _KILL is None and _FULL is None and _SIGNAL is None and _LOG is None:
        return
    if _LOG is not None:
        with open(_LOG, "a") as fh:
            fh.write(name + "\n")
    _reached[name] = count = _reached.get(name, 0) + 1
    if (name, count) == _KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    if (name, count) == _FULL:
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")
    if (name, count) == _SIGNAL:
        os.kill(os.getpid(), signal.SIGTERM)
