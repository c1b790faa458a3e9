"""Speed measurements the training benchmarks share (bench_train.py section 5, bench_gpu.py):
the host pipeline's samples/s, the model step's samples/s, the trainer's model with every
default, and an epoch clock. Keras is imported by the callers first (their backend)."""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np

from trainer.ml.config import TrainConfig
from trainer.ml.fitting import augmentation, compile_model
from trainer.ml.model import build_model
from trainer.ml.pipeline import BatchSequence, balanced_class_weights
from trainer.ml.stats import Stats


class EpochClock(keras.callbacks.Callback):
    """Seconds of every epoch (training and validation), in ``times``."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)

    def median(self) -> float:
        """The median epoch after the first (which traces and compiles)."""
        return float(np.median(self.times[1:] or self.times))


def training_sequence(ds: Any, indices: np.ndarray, cfg: TrainConfig, workers: int | None = None) -> BatchSequence:
    """The training batches as ``trainer train`` makes them (class weights included)."""
    weights = balanced_class_weights(ds.label_ids()[indices], len(ds.classes)) if cfg.class_weights else None
    return BatchSequence(ds, indices, cfg.batch_size, shuffle=True, seed=cfg.seed, class_weights=weights,
                         workers=workers)


def trainer_model(cfg: TrainConfig, stats: Stats, n_classes: int, steps: int) -> keras.Model:
    """The model ``trainer train`` fits for ``cfg``: augmentation, head dropout, optimizer, EMA."""
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.architecture, stats, n_classes, augmentation=augmentation(cfg),
                        head_dropout=cfg.head_dropout, layer_weighting=cfg.layer_weighting)
    compile_model(model, cfg, steps)
    return model


def pipeline_rate(seq: BatchSequence, passes: int = 3) -> float:
    """Samples/s of one thread making every batch of an epoch, each dropped as soon as it is
    made (as the fit loop drops it; keeping them all would time page faults instead); the best
    of ``passes`` (the machine is shared: the fastest pass is the least disturbed)."""
    samples = sum(len(b) for b in seq.plan)
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for i in range(len(seq)):
            seq[i]
        best = min(best, time.perf_counter() - start)
    return samples / best


class _Prepared(keras.utils.PyDataset):
    def __init__(self, batches: list[Any]) -> None:
        super().__init__(workers=1)
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]


def step_rate(model: keras.Model, seq: BatchSequence, epochs: int = 3) -> float:
    """Samples/s of ``model``'s training step alone: ``fit`` over ``seq``'s batches made
    beforehand (no pipeline, no validation), the median epoch after the first."""
    batches = [seq[i] for i in range(len(seq))]
    # After a fit with EMA, Keras's JAX backend leaves each weight sharing its buffer with its
    # average (finalize_variable_values assigns one to the other), and the next fit fails
    # ("donate the same buffer twice"); copies end that. (The trainer's AveragedWeightsAtEpochEnd
    # assigns copies at the end of every fit.)
    for variable in model.trainable_variables:
        variable.assign(keras.ops.convert_to_numpy(variable))
    clock = EpochClock()
    model.fit(_Prepared(batches), epochs=epochs, verbose=0, shuffle=False, callbacks=[clock])
    return sum(len(b[1]) for b in batches) / clock.median()
