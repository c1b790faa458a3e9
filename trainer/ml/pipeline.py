"""Batches for training and inference: similar lengths together, normalized, padded.

Frames stay in the one float16 dataset array; each batch is gathered, normalized and padded
on the fly (no per-epoch file decoding). Shuffled chunks sorted by length keep padding small
while the batch order stays random; lengths are rounded up to a multiple of 8 so backends
that compile per shape (JAX) see few shapes.

Training batches can be augmented (frame dropout, Gaussian noise, mixup) in numpy; the random
numbers of batch ``i`` of epoch ``e`` come from (seed, e, i) alone, so a continued run sees
exactly the batches an uninterrupted one would have, whatever order worker threads take, and
one continued from a position inside an epoch trains the rest of that very plan
(:meth:`BatchSequence.rest_of_epoch`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from trainer.ml.dataset import Dataset
from trainer.ml.stats import Stats

PAD_MULTIPLE = 8
SORT_CHUNK_BATCHES = 32  # batches per shuffled chunk that is sorted by length


def padded_length(longest: int) -> int:
    return PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)


def pad_batch(sequences: Sequence[np.ndarray], stats: Stats, time_steps: int | None = None) -> dict[str, np.ndarray]:
    """Normalize and zero-pad sequences (T_i, *F) into {"frames": (B, T, *F), "lengths": (B,)};
    T is the longest length rounded up to PAD_MULTIPLE, or ``time_steps`` when given."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    t = time_steps or padded_length(int(lengths.max()))
    out = np.zeros((len(sequences), t, *stats.mean.shape), dtype=np.float32)
    for row, seq in zip(out, sequences, strict=True):
        valid = row[: len(seq)]
        np.subtract(seq, stats.mean, out=valid)
        valid /= stats.std
    return {"frames": out, "lengths": lengths}


def length_sorted_batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int,
                          rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of similar length: shuffled chunks sorted by length (or one sorted pass)."""
    if rng is None:
        order = indices[np.argsort(lengths[indices], kind="stable")]
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = rng.permutation(indices)
    chunk = batch_size * SORT_CHUNK_BATCHES
    batches: list[np.ndarray] = []
    for start in range(0, len(perm), chunk):
        part = perm[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass(frozen=True)
class Augmentation:
    """What is done to training batches; all zero means nothing."""

    frame_dropout: float = 0.0  # share of each sequence's frames left out
    noise: float = 0.0  # standard deviation of the Gaussian noise on normalized frames
    mixup: float = 0.0  # Beta(mixup, mixup) mixing weights of pairs of sequences

    def __bool__(self) -> bool:
        return bool(self.frame_dropout or self.noise or self.mixup)


Batch = tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]
KerasBatch = tuple[np.ndarray | dict[str, np.ndarray], ...]  # (inputs, labels[, sample weights])


def drop_frames(seq: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``seq`` without a random ``share`` of its frames (order kept; at least one frame left)."""
    keep = rng.random(len(seq)) >= share
    if not keep.any():
        keep[rng.integers(len(seq))] = True
    return seq[keep]


def add_noise(inputs: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> None:
    """Gaussian noise on the valid frames of a padded batch, in place (padding stays zero)."""
    frames, lengths = inputs["frames"], inputs["lengths"]
    noise = rng.standard_normal(frames.shape, dtype=np.float32)
    noise *= std
    noise[np.arange(frames.shape[1])[None, :] >= lengths[:, None]] = 0.0
    frames += noise


def mix_pairs(batch: Batch, alpha: float, rng: np.random.Generator) -> Batch:
    """Mixup: each sequence mixed with a random partner of the batch, labels and sample weights
    alike; the mixed sequence is as long as the longer of the two (padding is zero)."""
    inputs, labels, weights = batch
    partner = rng.permutation(len(labels))
    lam = rng.beta(alpha, alpha, size=len(labels)).astype(np.float32)
    frames = inputs["frames"]
    lam_frames = lam.reshape(-1, *([1] * (frames.ndim - 1)))
    mixed = {"frames": lam_frames * frames + (1 - lam_frames) * frames[partner],
             "lengths": np.maximum(inputs["lengths"], inputs["lengths"][partner])}
    mixed_labels = lam[:, None] * labels + (1 - lam[:, None]) * labels[partner]
    mixed_weights = None if weights is None else lam * weights + (1 - lam) * weights[partner]
    return mixed, mixed_labels, mixed_weights


class BatchSequence(keras.utils.PyDataset):
    """Keras input for ``fit``/``evaluate``: (inputs, one-hot labels[, sample weights]).

    The batch order and the augmentation of epoch ``e`` depend only on (seed, e), so a
    continued run sees the same batches an uninterrupted one would have. Keras's ``fit`` calls
    ``on_epoch_end`` once as it starts (resetting its iterator): a sequence made at ``epoch``
    (the committed epochs) trains the run's 1-based epoch E on plan E.
    """

    def __init__(self, ds: Dataset, indices: np.ndarray, stats: Stats, batch_size: int,
                 shuffle: bool, seed: int = 0, epoch: int = 0,
                 class_weights: np.ndarray | None = None, workers: int | None = None,
                 augmentation: Augmentation | None = None) -> None:
        super().__init__(workers=workers or default_workers(), use_multiprocessing=False, max_queue_size=16)
        self.ds, self.indices, self.stats = ds, np.asarray(indices), stats
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.labels, self.lengths = ds.label_ids(), ds.lengths()
        self.n_classes = len(ds.classes)
        self.class_weights = class_weights
        self.augmentation = augmentation or Augmentation()
        self.epoch = epoch
        # One tuple, replaced whole, so a worker never pairs one epoch's plan with another's number.
        self.epoch_plan = (epoch, self._plan())

    def _plan(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        batches = length_sorted_batches(self.indices, self.lengths, self.batch_size, rng)
        # Keras (TensorFlow backend) infers the input signature from the first 2 batches: a
        # time axis of equal length in both would be fixed for the whole run. So the second
        # batch is one of another padded length whenever there is one (augmentation never
        # changes a batch's padded length: it is taken from the stored lengths).
        padded = [padded_length(int(self.lengths[b].max())) for b in batches]
        other = next((k for k in range(1, len(batches)) if padded[k] != padded[0]), None)
        if other is not None and other != 1:
            batches[1], batches[other] = batches[other], batches[1]
        return batches

    @property
    def plan(self) -> list[np.ndarray]:
        return self.epoch_plan[1]

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> KerasBatch:
        return self.batch(*self.epoch_plan, i)

    def batch(self, epoch: int, plan: list[np.ndarray], i: int) -> KerasBatch:
        """Batch ``i`` of ``plan`` (epoch ``epoch``'s), augmented with the numbers of (seed, epoch, i)."""
        idx = plan[i]
        sequences = [self.ds.sequence(int(k)) for k in idx]
        aug = self.augmentation
        rng = np.random.default_rng([self.seed, epoch, i, 1]) if aug else None
        if rng is not None and aug.frame_dropout:
            sequences = [drop_frames(s, aug.frame_dropout, rng) for s in sequences]
        inputs = pad_batch(sequences, self.stats, padded_length(int(self.lengths[idx].max())))
        onehot = np.eye(self.n_classes, dtype=np.float32)[self.labels[idx]]
        weights = None if self.class_weights is None else self.class_weights[self.labels[idx]].astype(np.float32)
        if rng is not None and aug.noise:
            add_noise(inputs, aug.noise, rng)
        if rng is not None and aug.mixup:
            inputs, onehot, weights = mix_pairs((inputs, onehot, weights), aug.mixup, rng)
        return (inputs, onehot) if weights is None else (inputs, onehot, weights)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.shuffle:
            self.epoch_plan = (self.epoch, self._plan())
        else:
            self.epoch_plan = (self.epoch, self.plan)

    def rest_of_epoch(self, start: int) -> RestOfEpoch:
        """The current plan's batches from ``start`` on: a fit over them continues a position."""
        return RestOfEpoch(self, start)

    def resumable_at(self, start: int) -> bool:
        """Whether a fit over the rest of the current plan from batch ``start`` sees the input
        signature a whole epoch does. Keras (TensorFlow backend) infers it from the first 2
        batches, so the rest's first 2 must differ in padded length exactly when the epoch's do
        (see _plan); a position is committed only where this holds (a batch or two later)."""
        plan = self.plan
        return 0 < start < len(plan) and self._time_axis(plan[start : start + 2]) == self._time_axis(plan[:2])

    def _time_axis(self, batches: list[np.ndarray]) -> int | None:
        """The padded length Keras infers from ``batches``: theirs when equal, else None (any)."""
        padded = {padded_length(int(self.lengths[b].max())) for b in batches}
        return padded.pop() if len(padded) == 1 else None


class RestOfEpoch(keras.utils.PyDataset):
    """The batches of one epoch's plan from ``start`` on, exactly as the whole epoch has them
    (the same augmentation numbers: batch ``start + i`` is batch ``start + i`` of the plan)."""

    def __init__(self, seq: BatchSequence, start: int) -> None:
        super().__init__(workers=seq.workers, use_multiprocessing=False, max_queue_size=16)
        self.seq, self.start = seq, start
        self.epoch, self.plan = seq.epoch_plan

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __getitem__(self, i: int) -> KerasBatch:
        return self.seq.batch(self.epoch, self.plan, self.start + i)

    # Keras's fit calls on_epoch_end as it starts: this is one epoch's rest, whatever it calls.


def default_workers() -> int:
    """Batch-preparing threads. On 2 cores they only compete with the training step
    (measured: slower than none); on a GPU box's many cores they keep the GPU fed."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores // 2)


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (K * count_k): a class 7x rarer weighs 7x more; absent classes weigh 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)
