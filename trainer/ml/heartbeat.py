"""The trainer's sign of life: ``heartbeat.json`` in the run folder, rewritten at most every few
seconds while it works (files loaded, batches trained, validation), with the median epoch time so
far. The machine's probe calls a running trainer whose last sign of life is older than
``monitor.stall_seconds`` (default: the larger of 10 minutes and three median epochs) stalled.
It is no committed state: written without fsync, never listed in the manifest, and a full disk
only skips a beat."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.machine.fsutil import temp_path

EVERY = 2.0  # seconds between two writes at the most


class Heartbeat:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / layout.HEARTBEAT
        self.fields: dict[str, Any] = {}
        self.last = 0.0

    def beat(self, *, force: bool = False, **fields: Any) -> None:
        """Note what the trainer is doing; written when the last write is EVERY seconds old (or ``force``)."""
        self.fields.update(fields)
        now = time.time()
        if not force and now - self.last < EVERY:
            return
        self.last = now
        tmp = temp_path(self.path)
        try:
            tmp.write_text(json.dumps({**self.fields, "time": now, "pid": os.getpid()}))
            os.replace(tmp, self.path)
        except OSError:  # a full disk: the next beat tries again
            with contextlib.suppress(OSError):
                tmp.unlink()
