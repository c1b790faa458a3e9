"""The classifier, in Keras 3 with ``keras.ops`` only (TensorFlow, JAX or PyTorch backend).

frames (B, T, D) or (B, T, L, D), float16 from the host  + lengths (B,)
  -> FrameDropout (training only: a random share of each sequence's frames removed)
  -> Standardize (the training split's mean/std, in float32)
  -> FeatureNoise (training only)
  -> [LayerWeighting: learned softmax over the L layers]
  -> Dense per frame (projection) -> LayerNorm -> Dropout
  -> AttentiveStatsPooling (attention-weighted mean and std over the frames FrameDropout
     keeps: the valid ones, less the dropped ones in training)
  -> head: Dropout -> Dense -> Dropout -> Dense(classes) logits (float32 even in mixed precision)

and mixup of pairs of sequences in :meth:`EmotionClassifier.train_step`. Every augmentation
runs on the device, inside the compiled step, and draws from a Keras ``SeedGenerator``: their
states are variables the checkpoint commits (trainer/ml/trainstate.py), so a continued run
draws exactly the numbers an uninterrupted one would. Inference never augments.

Sequence lengths are an explicit input, so padding never counts, whatever its values: no layer
before the pooling mixes frames, and the pooling weighs padded frames zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from trainer.ml.config import Architecture
from trainer.ml.stats import Stats

PACKAGE = "trainer"


@dataclass(frozen=True)
class Augmentation:
    """What is done to training batches, in the model's graph; all zero means nothing."""

    frame_dropout: float = 0.0  # share of each sequence's frames the pooling leaves out
    noise: float = 0.0  # standard deviation of the noise on normalized frames
    mixup: float = 0.0  # Beta(mixup, mixup) mixing weights of pairs of sequences

    def __bool__(self) -> bool:
        return bool(self.frame_dropout or self.noise or self.mixup)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Standardize(layers.Layer):
    """(x - mean) / std with fixed statistics, computed in float32 from whatever the input is
    (the host sends float16). The statistics are constants, not weights: a weights file loads
    into a model built with any statistics, so ``--init-from`` never replaces this run's."""

    def __init__(self, mean: Any, std: Any, **kwargs: Any) -> None:
        super().__init__(autocast=False, **kwargs)  # float16 must not pass through bfloat16
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = (1.0 / np.asarray(std, dtype=np.float32)).astype(np.float32)

    def call(self, x: Any) -> Any:
        return (ops.cast(x, "float32") - self.mean) * self.scale

    def compute_output_spec(self, x: Any) -> Any:
        return keras.KerasTensor(x.shape, dtype="float32")

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"mean": self.mean.tolist(), "std": (1.0 / self.scale).tolist()}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeatureNoise(layers.Layer):
    """Zero-mean noise of standard deviation ``stddev`` on every frame, in training only.
    Noise on padded frames is harmless: the pooling drops them.

    Drawn uniform on +-sqrt(3) * stddev, not Gaussian: on a CPU a Gaussian draw took 5.1 ms a
    batch of 32 x 24 x 768, 2.5x the first Dense's forward matmul and a quarter of the whole
    training step, against 2.1 ms for a uniform one (2 cores). What the model sees of it is
    Gaussian all the same: the next layer is linear over the features (the per-frame Dense, or
    the layer weighting then the Dense), and each of its outputs sums hundreds of independent
    draws, so their distribution is the Gaussian one of the same variance (central limit)."""

    HALF_WIDTH = math.sqrt(3.0)  # uniform on [-a, a] has standard deviation a / sqrt(3)

    def __init__(self, stddev: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stddev, self.seed = float(stddev), seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.stddev else None

    def call(self, x: Any, training: bool = False) -> Any:
        if not training or self.seed_generator is None:
            return x
        half_width = self.HALF_WIDTH * self.stddev
        return x + keras.random.uniform(ops.shape(x), minval=-half_width, maxval=half_width, dtype=x.dtype,
                                        seed=self.seed_generator)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"stddev": self.stddev, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FrameDropout(layers.Layer):
    """frames (B, T, ...) + lengths (B,) -> (frames (B, S, ...), keep (B, S)): the frames the
    pooling uses and a 0/1 mask of which of them count.

    At inference S = T and ``keep`` marks each row's first ``length`` frames. In training each
    sequence keeps a random ``1 - rate`` share of its valid frames (``(1 - rate) * length``
    frames, stochastically rounded so that the share is exact on average, and at least one),
    gathered into S = ceil((1 - rate) * T) slots: the dropped frames are removed, not only
    masked, so every layer after this one computes on about ``1 - rate`` of the frames (half,
    by default). Nothing before the pooling mixes frames and the pooling ignores their order,
    so this is exactly training on the shortened sequences. S depends on T alone: the compiled
    shapes stay as few as the padded lengths."""

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(autocast=False, **kwargs)  # frames pass as they came (no bfloat16 on the way)
        self.rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate else None

    def call(self, frames: Any, lengths: Any, training: bool = False) -> tuple[Any, Any]:
        steps = ops.shape(frames)[1]
        lengths = ops.cast(lengths, "int32")
        valid = ops.expand_dims(ops.arange(steps), 0) < ops.expand_dims(lengths, 1)
        if not training or self.seed_generator is None:
            return frames, ops.cast(valid, "float32")
        share = 1.0 - self.rate
        draws = keras.random.uniform((ops.shape(frames)[0], steps), seed=self.seed_generator)
        rounding = keras.random.uniform(ops.shape(lengths), seed=self.seed_generator)
        kept = ops.maximum(ops.cast(ops.floor(share * ops.cast(lengths, "float32") + rounding), "int32"), 1)
        # The highest draws of each row's valid frames (padding draws -1: never chosen before them).
        chosen = ops.top_k(ops.where(valid, draws, -1.0), _slots(steps, share))[1]
        keep = ops.expand_dims(ops.arange(ops.shape(chosen)[1]), 0) < ops.expand_dims(kept, 1)
        # One flat gather: take_along_axis broadcasts the indices over the features first
        # (measured: 27 ms of a 50 ms step on one CPU core, against ~1 ms for this).
        rows = ops.expand_dims(ops.arange(ops.shape(frames)[0]) * steps, 1)
        flat = ops.reshape(frames, (-1, *frames.shape[2:]))
        return ops.take(flat, chosen + rows, axis=0), ops.cast(keep, "float32")

    def compute_output_spec(self, frames: Any, lengths: Any, training: bool = False) -> tuple[Any, Any]:
        shape = (frames.shape[0], None, *frames.shape[2:])
        return keras.KerasTensor(shape, dtype=frames.dtype), keras.KerasTensor(shape[:2], dtype="float32")

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"rate": self.rate, "seed": self.seed}


def _slots(steps: Any, share: float) -> Any:
    """ceil(share * steps), at least 1: a Python int where the time axis is static (JAX,
    PyTorch), a tensor where it is not (TensorFlow's traced steps)."""
    if isinstance(steps, int):
        return max(1, math.ceil(share * steps))
    return ops.maximum(ops.cast(ops.ceil(share * ops.cast(steps, "float32")), "int32"), 1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class LayerWeighting(layers.Layer):
    """(B, T, L, D) -> (B, T, D): a learned softmax-weighted sum of the model's layers."""

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.layer_logits = self.add_weight(
            shape=(input_shape[-2],), initializer="zeros", name="layer_logits"
        )

    def call(self, x: Any) -> Any:
        weights = ops.cast(ops.softmax(self.layer_logits), x.dtype)
        return ops.einsum("btld,l->btd", x, weights)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (*input_shape[:-2], input_shape[-1])


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentiveStatsPooling(layers.Layer):
    """(B, T, H) + keep (B, T) -> (B, 2H): attention-weighted mean and standard deviation over
    the frames ``keep`` marks 1; the others (padding, dropped frames) get zero weight."""

    def __init__(self, units: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        width = input_shape[-1]
        self.w = self.add_weight(shape=(width, self.units), initializer="glorot_uniform", name="w")
        self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")
        self.v = self.add_weight(shape=(self.units,), initializer="glorot_uniform", name="v")

    def call(self, x: Any, keep: Any) -> Any:
        x32 = ops.cast(x, "float32")
        keep = ops.cast(keep, "float32")
        scores = ops.tensordot(ops.tanh(ops.tensordot(x32, ops.cast(self.w, "float32"), 1) + self.b),
                               ops.cast(self.v, "float32"), 1)  # (B, T)
        scores = ops.where(keep > 0, scores, ops.full_like(scores, -1e9))
        weights = ops.softmax(scores, axis=-1) * keep
        weights = ops.expand_dims(weights / ops.maximum(ops.sum(weights, -1, keepdims=True), 1e-9), -1)
        mean = ops.sum(weights * x32, axis=1)
        var = ops.sum(weights * ops.square(x32), axis=1) - ops.square(mean)
        std = ops.sqrt(ops.maximum(var, 1e-6))
        return ops.cast(ops.concatenate([mean, std], axis=-1), x.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], 2 * input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"units": self.units}


@keras.saving.register_keras_serializable(package=PACKAGE)
class EmotionClassifier(keras.Model):
    """The functional model, plus mixup in ``train_step``: each sequence of a training batch
    mixed with a random partner of the batch (Beta(mixup, mixup) weights), its lengths the
    longer of the two, labels and sample weights mixed alike, before the usual step.

    Mixup is here, not in a layer, because the labels must be mixed with the same numbers; the
    override mixes and hands the batch to the backend's own ``train_step``, so one method serves
    every backend (JAX's stateless step only needs the generator's state passed through)."""

    def __init__(self, *args: Any, mixup: float = 0.0, mixup_seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixup, self.mixup_seed = float(mixup), mixup_seed
        self.mixup_generator = keras.random.SeedGenerator(mixup_seed) if self.mixup else None

    def train_step(self, *args: Any) -> Any:
        if self.mixup_generator is None:
            return super().train_step(*args)
        if keras.backend.backend() != "jax":
            (data,) = args
            return super().train_step(self.mix(data))
        state, data = args  # JAX: (trainable, non-trainable, optimizer, metrics variables), data
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        mapping = list(zip(self.non_trainable_variables, non_trainable, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            data = self.mix(data)
        non_trainable = [_current(scope, ref, value) for ref, value in mapping]
        return super().train_step((trainable, non_trainable, optimizer_variables, metrics_variables), data)

    def mix(self, data: Any) -> tuple[Any, Any, Any]:
        """The mixed batch (x, y, sample weights). Frames are mixed in float32 with the partner's
        padding as the mean frame (zero once normalized): mixing is linear, so mixing raw
        frames then normalizing is mixing normalized ones."""
        x, y, weights = keras.utils.unpack_x_y_sample_weight(data)
        batch = ops.shape(y)[0]
        partner = keras.random.shuffle(ops.arange(batch), seed=self.mixup_generator)
        lam = keras.random.beta((batch,), self.mixup, self.mixup, seed=self.mixup_generator)
        frames, lengths = ops.cast(x["frames"], "float32"), ops.cast(x["lengths"], "int32")
        valid = ops.expand_dims(ops.arange(ops.shape(frames)[1]), 0) < ops.expand_dims(lengths, 1)
        for _ in range(len(frames.shape) - 2):
            valid = ops.expand_dims(valid, -1)
        frames = ops.where(valid, frames, self.get_layer("standardize").mean)

        def mixed(a: Any) -> Any:
            w = ops.reshape(lam, (-1, *([1] * (len(a.shape) - 1))))
            return w * a + (1.0 - w) * ops.take(a, partner, axis=0)

        x = {"frames": mixed(frames), "lengths": ops.maximum(lengths, ops.take(lengths, partner, axis=0))}
        return x, mixed(ops.cast(y, "float32")), None if weights is None else mixed(ops.cast(weights, "float32"))

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"mixup": self.mixup, "mixup_seed": self.mixup_seed}


def _current(scope: Any, variable: Any, value: Any) -> Any:
    new = scope.get_current_value(variable)
    return value if new is None else new


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``floor * peak``."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, floor: float = 0.05) -> None:
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.floor = float(floor)

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        decay = self.peak * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + ops.cos(math.pi * progress)))
        return ops.where(step < self.warmup_steps, warm, decay)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "floor": self.floor}


def build_model(arch: Architecture, stats: Stats, n_classes: int, *, augmentation: Augmentation | None = None,
                head_dropout: float = 0.0, layer_weighting: bool = True) -> EmotionClassifier:
    """A fresh, built model for frames of ``stats``' per-frame shape, normalized in the graph by
    ``stats``. Weights saved from any model built with the same ``arch`` and feature shape load
    (``augmentation``, ``head_dropout`` and ``layer_weighting`` only change training: with
    ``layer_weighting`` off the layer weights stay at their uniform start)."""
    aug = augmentation or Augmentation()
    feature_shape = tuple(stats.mean.shape)
    frames = keras.Input(shape=(None, *feature_shape), name="frames")
    lengths = keras.Input(shape=(), dtype="int32", name="lengths")
    x, keep = FrameDropout(aug.frame_dropout, name="frame_dropout")(frames, lengths)
    x = Standardize(stats.mean, stats.std, name="standardize")(x)
    x = FeatureNoise(aug.noise, name="feature_noise")(x)
    if len(feature_shape) == 2:
        x = LayerWeighting(name="layer_weighting", trainable=layer_weighting)(x)
    x = layers.Dense(arch.hidden, activation="gelu", name="frame_projection")(x)
    x = layers.LayerNormalization(name="frame_norm")(x)
    x = layers.Dropout(arch.dropout)(x)
    x = AttentiveStatsPooling(arch.attention, name="pooling")(x, keep)
    # The head sees one vector per utterance: its dropout is set apart from the frames'.
    x = layers.Dropout(head_dropout)(x)
    x = layers.Dense(arch.hidden, activation="gelu", name="classifier_hidden")(x)
    x = layers.Dropout(head_dropout)(x)
    logits = layers.Dense(n_classes, dtype="float32", name="logits")(x)
    return EmotionClassifier({"frames": frames, "lengths": lengths}, logits, mixup=aug.mixup,
                             name="emotion_classifier")
