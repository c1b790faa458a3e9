"""The Keras callback that commits each finished epoch (and, on a stop, a position inside one)
into the run directory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from trainer.contract import layout
from trainer.machine import faults
from trainer.ml import stopping, trainstate
from trainer.ml.rundir import RunDir, Stopwatch
from trainer.ml.runstate import Position

Log = Callable[[str], None]


class RunRecorder(keras.callbacks.Callback):
    """Per finished epoch: weights (model + optimizer) under the epoch's own name, then the
    state file (THE commit point, with the random generators' states), then everything derived
    from it (trainer/contract/layout.py). On a stop, where trainer/ml/stopping.py says so, the
    position inside the epoch instead.

    It relies on no other callback: it saves whatever the model holds when its hooks run, and
    the state it commits is its own. ``train_seq`` is the training sequence (its plan tells where
    a position can be continued)."""

    def __init__(self, run: RunDir, stopper: stopping.Stopper, log: Log, train_seq: Any) -> None:
        super().__init__()
        self.run, self.stopper, self.log, self.train_seq = run, stopper, log, train_seq
        self.heartbeat = run.heartbeat
        self.failure: str | None = None
        self.clock = Stopwatch()
        self.threshold = stopping.finish_epoch_seconds()
        self._before, self._seconds_before, self._done, self._waits = 0, 0.0, 0, False

    # ---- where in the epoch: a continued position starts at its batch, with its accumulators
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        partial = self.run.state.partial
        resumed = partial is not None and partial.epoch == epoch + 1
        if resumed:
            trainstate.assign_metrics(self.model, partial.metrics)
        self._before = partial.batch if resumed else 0
        self._seconds_before = partial.seconds if resumed else 0.0
        self._done, self._waits = self._before, False
        self.clock.lap()
        self.heartbeat.beat(force=True, phase="training", epoch=epoch + 1, batch=self._before, batches=self._steps())

    def _steps(self) -> int:
        return self._before + (self.params or {}).get("steps", 0)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        faults.point("train:batch")
        self._done = self._before + batch + 1
        self.heartbeat.beat(phase="training", batch=self._done)
        if self.stopper.signum is not None and not self.model.stop_training:
            self._on_stop(self._done)

    def on_test_begin(self, logs: dict | None = None) -> None:
        faults.point("validate:begin")

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.heartbeat.beat(phase="validating", batch=batch + 1)

    # ---- a stop during the epoch
    def _on_stop(self, done: int) -> None:
        """Wait for the epoch's end when it is near (or all its batches are trained), else
        commit this position as soon as it can be continued, and stop."""
        steps = self._steps()
        seconds = self.clock.peek()
        if stopping.finishes_epoch(done, steps, seconds, done - self._before, self.threshold):
            if not self._waits:
                self._waits = True
                self.log(f"signal {self.stopper.signum}: epoch {self.run.state.epoch + 1} ends in "
                         f"{steps - done} batches; stopping after its commit")
            return
        if self.train_seq.resumable_at(done):
            self._commit_position(done, steps, seconds)
            self.model.stop_training = True

    def _commit_position(self, done: int, steps: int, seconds: float) -> None:
        epoch = self.run.state.epoch + 1
        saved = self.run.write_checkpoint(epoch, lambda tmp: self.model.save_weights(tmp), batch=done)
        rng = trainstate.values(trainstate.rng_variables(self.model))
        metrics = trainstate.values(self.model.metrics_variables)
        position = Position(epoch, done, saved, rng, metrics, round(self._seconds_before + seconds, 3))
        self.run.commit(self.run.state.at_position(position))
        self.run.publish(layout.RUNNING)
        self.log(f"signal {self.stopper.signum}: committed batch {done} of {steps} of epoch {epoch}")

    # ---- the end of an epoch
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._done < self._steps():
            return  # stopped inside the epoch: its position is committed, the epoch is not finished
        row = self._row(epoch + 1, logs or {})
        bad = [k for k in ("loss", "val_loss") if not np.isfinite(row[k])]
        if bad:
            self.failure = (f"{bad[0]} became {row[bad[0]]} at epoch {epoch + 1}; the last good "
                            "checkpoint is kept. Try a lower --learning-rate or check the data "
                            "with python -m trainer check-data")
            self.model.stop_training = True
            return
        saved = self.run.write_checkpoint(epoch + 1, lambda tmp: self.model.save_weights(tmp))
        rng = trainstate.values(trainstate.rng_variables(self.model))
        self.run.commit(self.run.state.after_epoch(row, saved, rng))
        self.run.publish(layout.RUNNING)
        seconds = sorted(r["seconds"] for r in self.run.state.history[-10:])
        self.heartbeat.beat(force=True, phase="committed", median_epoch_seconds=seconds[len(seconds) // 2])
        if self.stopper.signum is not None:
            self.model.stop_training = True  # a stop during this epoch: it is kept, the run ends here

    def _row(self, epoch: int, logs: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            row[key] = float(logs.get(key, float("nan")))
        row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["seconds"] = round(self._seconds_before + self.clock.lap(), 3)
        return row
