"""Holding the machine busy while orch works there (verb ``hold``):

    hold ROOT SILENCE

takes a shared flock on ROOT/activity.lock (the autostop watcher never calls the machine idle
while one is held) and keeps it while orch pings: a byte on stdin at least every SILENCE
seconds. After SILENCE seconds without one (the laptop vanished, the connection died without
closing), or at EOF, it exits and the lock is free again. Standard library only.
"""

from __future__ import annotations

import os
import select
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.machine.locks import held


def hold(root: Path, silence: float) -> int:
    root.mkdir(parents=True, exist_ok=True)
    with held(root / layout.ACTIVITY_LOCK, shared=True):
        while select.select([0], [], [], silence)[0] and os.read(0, 64):
            pass
    return 0


def run(verb: str, argv: list[str], out: Any) -> int:
    return hold(Path(argv[0]), float(argv[1]))
