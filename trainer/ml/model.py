"""The classifier, in Keras 3 with ``keras.ops`` only (TensorFlow, JAX or PyTorch backend).

frames (B, T, D) or (B, T, L, D)  + lengths (B,)
  -> [LayerWeighting: learned softmax over the L layers]
  -> Dense per frame (projection) -> LayerNorm -> Dropout
  -> AttentiveStatsPooling (attention-weighted mean and std over the *valid* frames)
  -> head: Dropout -> Dense -> Dropout -> Dense(classes) logits (float32 even in mixed precision)

Sequence lengths are an explicit input, so padding never counts, whatever its values.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import layers, ops

from trainer.ml.config import Architecture

PACKAGE = "trainer"


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
    """(B, T, H) + lengths (B,) -> (B, 2H): attention-weighted mean and standard deviation
    over the first ``length`` frames of each sequence; padded frames get zero weight."""

    def __init__(self, units: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        width = input_shape[-1]
        self.w = self.add_weight(shape=(width, self.units), initializer="glorot_uniform", name="w")
        self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")
        self.v = self.add_weight(shape=(self.units,), initializer="glorot_uniform", name="v")

    def call(self, x: Any, lengths: Any) -> Any:
        x32 = ops.cast(x, "float32")
        scores = ops.tensordot(ops.tanh(ops.tensordot(x32, ops.cast(self.w, "float32"), 1) + self.b),
                               ops.cast(self.v, "float32"), 1)  # (B, T)
        positions = ops.arange(ops.shape(x)[1])
        mask = ops.expand_dims(positions, 0) < ops.expand_dims(ops.cast(lengths, "int32"), 1)
        scores = ops.where(mask, scores, ops.full_like(scores, -1e9))
        weights = ops.softmax(scores, axis=-1) * ops.cast(mask, "float32")
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


def build_model(arch: Architecture, feature_shape: tuple[int, ...], n_classes: int, *,
                head_dropout: float = 0.0, layer_weighting: bool = True) -> keras.Model:
    """A fresh, built model; weights saved from any model built with the same ``arch`` and
    ``feature_shape`` load (``head_dropout`` and ``layer_weighting`` only change training:
    with ``layer_weighting`` off the layer weights stay at their uniform start)."""
    frames = keras.Input(shape=(None, *feature_shape), name="frames")
    lengths = keras.Input(shape=(), dtype="int32", name="lengths")
    x = frames
    if len(feature_shape) == 2:
        x = LayerWeighting(name="layer_weighting", trainable=layer_weighting)(x)
    x = layers.Dense(arch.hidden, activation="gelu", name="frame_projection")(x)
    x = layers.LayerNormalization(name="frame_norm")(x)
    x = layers.Dropout(arch.dropout)(x)
    x = AttentiveStatsPooling(arch.attention, name="pooling")(x, lengths)
    # The head sees one vector per utterance: its dropout is set apart from the frames'.
    x = layers.Dropout(head_dropout)(x)
    x = layers.Dense(arch.hidden, activation="gelu", name="classifier_hidden")(x)
    x = layers.Dropout(head_dropout)(x)
    logits = layers.Dense(n_classes, dtype="float32", name="logits")(x)
    return keras.Model({"frames": frames, "lengths": lengths}, logits, name="emotion_classifier")
