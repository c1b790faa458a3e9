"""How the model is fitted, from a TrainConfig: the optimizer and loss, the augmentation of the
training batches, and the callbacks that average weights and stop early.

The generalization measures live here (and in :mod:`trainer.ml.model`, where the augmentation
runs, in the graph); :mod:`trainer.ml.train` only wires them in. Each one's default was chosen by its effect on
speakers that neither training nor validation saw (``bench/bench_train.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from trainer.ml.config import TrainConfig
from trainer.ml.model import Augmentation, WarmupCosine

Log = Callable[[str], None]


def augmentation(cfg: TrainConfig) -> Augmentation:
    return Augmentation(frame_dropout=cfg.frame_dropout, noise=cfg.feature_noise, mixup=cfg.mixup)


def ema_momentum(ema_epochs: float, steps_per_epoch: int) -> float:
    """The per-step momentum of an average over about ``ema_epochs`` epochs (1 - 1/steps)."""
    return max(0.0, 1.0 - 1.0 / max(ema_epochs * steps_per_epoch, 1.0))


def compile_model(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int,
                  replicas: int = 1) -> keras.optimizers.Optimizer:
    """Compile ``model`` with AdamW (warm-up then cosine decay, gradient clipping, the weight
    average when ``ema_epochs`` is set) and the label-smoothed cross-entropy; returns the optimizer.
    With several ``replicas`` the accuracy is a weighted metric: the rows that top a batch up to a
    multiple of them weigh 0 and must not count (training accuracy is then class-weighted too)."""
    accuracy = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    schedule = WarmupCosine(cfg.learning_rate, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)
    ema: dict[str, Any] = {}
    if cfg.ema_epochs:
        ema = {"use_ema": True, "ema_momentum": ema_momentum(cfg.ema_epochs, steps_per_epoch)}
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay, global_clipnorm=cfg.clip_norm, **ema)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing),
                  **({"weighted_metrics": accuracy} if replicas > 1 else {"metrics": accuracy}))
    # Built now, not by the first training step: slots created while TensorFlow traces the step
    # make it trace the whole step a second time (seconds of every trainer start). The model's
    # optimizer: in mixed float16 it is the LossScaleOptimizer wrapping ours, whose loss scale a
    # checkpoint must load into too.
    model.optimizer.build(model.trainable_variables)
    return optimizer


def training_callbacks(cfg: TrainConfig, recorder: Any, averaged_in_model: bool,
                       log: Log) -> list[keras.callbacks.Callback]:
    """The callbacks in the order that matters: the weight average swapped in BEFORE the
    recorder (so validation, the best and the last checkpoint are the averaged weights),
    early stopping AFTER it (it reads the epoch the recorder has just committed).
    ``averaged_in_model``: the model starts from an epoch's checkpoint (the average in it)."""
    callbacks: list[keras.callbacks.Callback] = []
    if cfg.ema_epochs:
        callbacks.append(AveragedWeightsAtEpochEnd(averaged_in_model))
    callbacks.append(recorder)
    if cfg.patience:
        callbacks.append(EarlyStop(recorder, cfg.patience, log))
    return callbacks


class AveragedWeightsAtEpochEnd(keras.callbacks.SwapEMAWeights):
    """Keras's SwapEMAWeights(swap_on_epoch=True): between epochs (and while validating) the
    model holds the averaged weights and the optimizer's EMA slots the raw ones, which is how
    the recorder checkpoints an epoch (a position inside one has the raw weights in the model).
    A run continued from an epoch loads such a checkpoint, so it starts with the average in the
    model (``averaged_in_model``): the first epoch swaps back, and training goes on exactly as
    if it had never stopped.

    Unlike Keras's, the model holds the average after ``fit`` too, whichever epoch it ended at:
    ``fit`` ends by copying the slots into the model (``finalize_variable_values``), so the
    average is kept at every epoch's end and put back. The slots keep the raw weights, so a
    continued position's ``fit`` over the rest of its epoch hands the next ``fit`` exactly
    what an uninterrupted run has between two epochs.

    Two swaps an epoch, not Keras's four: validation ends the epoch, so the average it swapped
    in stays for the epoch's end (nothing trains in between). On TensorFlow a swap is one
    compiled graph of copies (~0.5 ms): Keras's eager one (a += b; b = a - b; a -= b, three
    distributed updates per weight) took 20-45 ms a swap on 2 cores, and float sums do not
    give back the same bits."""

    def __init__(self, averaged_in_model: bool) -> None:
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = averaged_in_model
        self._average: list[Any] | None = None
        self._fitting = False
        self._compiled_swap: Callable[[], Any] | None = None

    def _swap_variables(self) -> None:
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if self._compiled_swap is None:
                optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
                self._compiled_swap = tf.function(_swap_of(optimizer), autograph=False)
            self._compiled_swap()
            return
        self._apply_to_ema_optimizers(self._backend_swap_variables, self._backend_swap_variables)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fitting = True

    def on_test_end(self, logs: dict | None = None) -> None:
        if not self._fitting:  # an evaluate() of its own: the raw weights go back
            super().on_test_end(logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self._ema_weights_in_model:
            self._swap_variables()
            self._ema_weights_in_model = True
        self._average = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]

    def on_train_end(self, logs: dict | None = None) -> None:
        self._fitting = False
        if self._average is not None and self._ema_weights_in_model:
            for variable, average in zip(self.model.trainable_variables, self._average, strict=True):
                variable.assign(average)


def _swap_of(optimizer: keras.optimizers.Optimizer) -> Callable[[], None]:
    """A function swapping every weight with its average, each pair read then written, on the
    TensorFlow variables (a MirroredStrategy's on every replica), to be compiled as one graph."""
    pairs = [(weight.value, average.value) for weight, average in
             zip(optimizer._trainable_variables, optimizer._model_variables_moving_average, strict=True)]

    def swap() -> None:
        for weight, average in pairs:
            raw, averaged = weight.read_value(), average.read_value()
            weight.assign(averaged)
            average.assign(raw)

    return swap


class EarlyStop(keras.callbacks.Callback):
    """Stop once the run's best epoch is ``patience`` epochs behind the last committed one.

    It counts from the recorder's committed best epoch, not from a counter of its own, so a
    continued run stops where an uninterrupted one would, and an extended run (best epoch 0:
    its parent) stops when it has not beaten its parent for ``patience`` epochs. The run
    keeps, evaluates and predicts with its best checkpoint, never the last weights."""

    def __init__(self, recorder: Any, patience: int, log: Log) -> None:
        super().__init__()
        self.recorder, self.patience, self.log = recorder, patience, log

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        state = self.recorder.run.state  # what the recorder has just committed
        best = state.best_epoch
        if best is not None and state.epoch - best >= self.patience and not self.model.stop_training:
            self.model.stop_training = True
            self.log(f"early stop after epoch {state.epoch}: no better val_accuracy for "
                     f"{self.patience} epochs (best at epoch {best})")
