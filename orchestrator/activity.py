"""While orch works on the machine (deploy, resume, download), it holds a shared flock there
(ROOT/activity.lock) through a small command left running: the autostop watcher never calls
the machine idle meanwhile. The command pings back-and-forth-free: orch writes a byte every
PING seconds; after SILENCE seconds without one (the laptop vanished, the connection died
without closing) the command exits and the lock is free again."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from orchestrator.machine import Machine
from orchestrator.remote import q
from trainer import layout

PING = 20.0
SILENCE = 90.0
HOLD = f"""\
import fcntl, os, select, sys
os.makedirs(sys.argv[1], exist_ok=True)
lock = os.open(os.path.join(sys.argv[1], {layout.ACTIVITY_LOCK!r}), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(lock, fcntl.LOCK_SH)
while select.select([0], [], [], float(sys.argv[2]))[0] and os.read(0, 64):
    pass
"""


@contextlib.contextmanager
def activity(m: Machine, ping_every: float = PING, silence: float = SILENCE) -> Iterator[None]:
    """Hold the machine's activity lock for the duration of the block."""
    held = m.remote.start(f"{q(m.helper_python)} -c {q(HOLD)} {q(m.root)} {silence}")
    stop = threading.Event()

    def ping() -> None:
        while not stop.wait(ping_every):
            try:
                held.write(b".")
            except Exception:  # the connection is gone: so is the lock, with the command
                return

    pinger = threading.Thread(target=ping, daemon=True, name="orch-activity")
    pinger.start()
    try:
        yield
    finally:
        stop.set()
        held.close()
