"""The Keras callback that commits each finished epoch into the run directory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from trainer.contract import layout
from trainer.ml.rundir import RunDir, Stopwatch

Log = Callable[[str], None]


class RunRecorder(keras.callbacks.Callback):
    """Per finished epoch: weights (model + optimizer) under the epoch's own name, then the
    state file (THE commit point), then everything derived from it (trainer/contract/layout.py).

    It relies on no other callback: it saves whatever the model holds when its
    ``on_epoch_end`` runs, and the state it commits is its own."""

    def __init__(self, run: RunDir, stopper: Any, log: Log) -> None:
        super().__init__()
        self.run, self.stopper, self.log = run, stopper, log
        self.heartbeat = run.heartbeat
        self.failure: str | None = None
        self.clock = Stopwatch()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.clock.lap()
        self.heartbeat.beat(force=True, phase="training", epoch=epoch + 1, batch=0,
                            batches=(self.params or {}).get("steps"))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.heartbeat.beat(phase="training", batch=batch + 1)

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.heartbeat.beat(phase="validating", batch=batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.stopper.signum is not None:
            return  # a partial epoch (stopped mid-way) is not a finished epoch
        row = self._row(epoch + 1, logs or {})
        bad = [k for k in ("loss", "val_loss") if not np.isfinite(row[k])]
        if bad:
            self.failure = (f"{bad[0]} became {row[bad[0]]} at epoch {epoch + 1}; the last good "
                            "checkpoint is kept. Try a lower --learning-rate or check the data "
                            "with python -m trainer check-data")
            self.model.stop_training = True
            return
        saved = self.run.write_checkpoint(epoch + 1, lambda tmp: self.model.save_weights(tmp))
        self.run.commit(self.run.state.after_epoch(row, saved))
        self.run.publish(layout.RUNNING)
        seconds = sorted(r["seconds"] for r in self.run.state.history[-10:])
        self.heartbeat.beat(force=True, phase="committed", median_epoch_seconds=seconds[len(seconds) // 2])

    def _row(self, epoch: int, logs: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            row[key] = float(logs.get(key, float("nan")))
        row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["seconds"] = round(self.clock.lap(), 3)
        return row
