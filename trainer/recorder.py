"""The Keras callback that records each finished epoch into the run directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from trainer import layout
from trainer.config import TrainConfig
from trainer.fsutil import atomic_write_json
from trainer.rundir import RunDir, Stopwatch

Log = Callable[[str], None]


class RunRecorder(keras.callbacks.Callback):
    """Writes each finished epoch into the run directory, in an order that survives a kill:
    best checkpoint (if improved) -> last checkpoint -> last.state.json -> metrics, status,
    manifest. On restart, metrics.jsonl is rewritten from last.state.json's history."""

    def __init__(self, run: RunDir, cfg: TrainConfig, state: dict | None, stopper: Any, log: Log) -> None:
        super().__init__()
        self.run, self.cfg, self.log = run, cfg, log
        self.history: list[dict[str, Any]] = list(state["history"]) if state else []
        self.epoch: int = state["epoch"] if state else 0
        self.best: float | None = state["best_val_accuracy"] if state else cfg.parent_best_val_accuracy
        self.best_epoch: int | None = state["best_epoch"] if state else (0 if cfg.parent_run else None)
        self.failure: str | None = None
        self.stopper = stopper
        self.clock = Stopwatch()
        run.write_metrics(self.history)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.clock.lap()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.stopper.signum is not None:
            return  # a partial epoch (stopped mid-way) is not a finished epoch
        logs = logs or {}
        row = {"epoch": epoch + 1}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            row[key] = float(logs.get(key, float("nan")))
        bad = [k for k in ("loss", "val_loss") if not np.isfinite(row[k])]
        if bad:
            self.failure = (f"{bad[0]} became {row[bad[0]]} at epoch {epoch + 1}; the last good "
                            "checkpoint is kept. Try a lower --learning-rate or check the data "
                            "with python -m trainer check-data")
            self.model.stop_training = True
            return
        row["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["seconds"] = round(self.clock.lap(), 3)
        if self.best is None or row["val_accuracy"] > self.best:
            self.best, self.best_epoch = row["val_accuracy"], epoch + 1
            self._save_weights(layout.BEST_WEIGHTS)
        self._save_weights(layout.LAST_WEIGHTS)
        self.history.append(row)
        self.epoch = epoch + 1
        atomic_write_json(self.run.file(layout.LAST_STATE), {
            "epoch": self.epoch, "best_val_accuracy": self.best, "best_epoch": self.best_epoch,
            "history": self.history,
        })
        self.run.write_metrics(self.history)
        self.run.write_status(layout.RUNNING, epoch=self.epoch, val_accuracy=row["val_accuracy"],
                              best_val_accuracy=self.best, best_epoch=self.best_epoch)
        self.run.refresh_manifest()

    def _save_weights(self, rel: str) -> None:
        path = self.run.file(rel)
        # Keras insists on the .weights.h5 suffix, so the temp name keeps it.
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        self.model.save_weights(tmp)
        os.replace(tmp, path)
