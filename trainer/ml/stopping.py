"""SIGTERM/SIGINT (``orch stop``): the run stops without losing finished work.

Before training, the trainer stops at once (state ``stopped``). During ``fit`` the signal is
only noted; the recorder decides at the next batch end (trainer/ml/recorder.py):

- the epoch's batches are all trained (the signal came during its last batch, its validation
  or its commit): the epoch is committed as usual, then the run stops;
- the epoch's end is at most :data:`FINISH_EPOCH_SECONDS` away (its remaining batches at this
  epoch's mean batch time so far): the same, at the epoch's end;
- further away: the position inside the epoch is committed (trainer/contract/layout.py), then
  the run stops; a continued run trains on from that batch.

``ORCH_TRAINER_FINISH_EPOCH_SECONDS`` overrides the threshold (tests set 0 to force a position).

A stop whose run folder holds an ``interruption.json`` written after this trainer started (the
machine's watcher writes it just before its SIGTERM, on a spot notice: trainer/machine/watcher.py)
is an interruption: the same commit, then state ``interrupted`` instead of ``stopped``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.wire import Interruption, WireError
from trainer.machine.readers import read_json

FINISH_EPOCH_SECONDS = 20.0
ENV = "ORCH_TRAINER_FINISH_EPOCH_SECONDS"


def finish_epoch_seconds() -> float:
    """The threshold: :data:`FINISH_EPOCH_SECONDS`, or the environment's (a test hook)."""
    return float(os.environ.get(ENV) or FINISH_EPOCH_SECONDS)


def finishes_epoch(done: int, steps: int, seconds: float, trained: int, threshold: float) -> bool:
    """Whether a stop waits for the epoch's end: ``done`` of ``steps`` batches are trained, the
    last ``trained`` of them by this process in ``seconds``."""
    if done >= steps:
        return True
    return (steps - done) * seconds / max(trained, 1) <= threshold


def interruption(run_dir: Path, since: float) -> Interruption | None:
    """The spot notice behind a stop: ``interruption.json`` if it was written at ``since`` (this
    trainer's start) or later and is one (checked: the watcher's file, but a file all the same)."""
    doc = read_json(run_dir / layout.INTERRUPTION, limit=4096)
    try:
        notice = Interruption.from_json(doc)
    except WireError:
        return None
    return notice if notice.noticed_at is not None and notice.noticed_at >= since else None


class StopRequested(BaseException):
    """Raised by the signal handler wherever the main thread is. A BaseException, as
    KeyboardInterrupt is: library code's ``except Exception`` (inspect's, turning any error into
    "TypeError: unsupported callable", under Keras building the model) must not swallow or
    convert it (a stop during start-up ended as *failed*)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class Stopper:
    """Notes SIGTERM/SIGINT. Outside ``fit`` (``training`` False) it raises StopRequested at
    once; during it the recorder decides where to stop (above)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.training = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum
        if not self.training:
            raise StopRequested(signum)

    def __enter__(self) -> Stopper:
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
