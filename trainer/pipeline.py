"""Batches for training and inference: similar lengths together, normalized, padded.

Frames stay in the one float16 dataset array; each batch is gathered, normalized and padded
on the fly (no per-epoch file decoding). Shuffled chunks sorted by length keep padding small
while the batch order stays random; lengths are rounded up to a multiple of 8 so backends
that compile per shape (JAX) see few shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import keras
import numpy as np

from trainer.data import Dataset
from trainer.stats import Stats

PAD_MULTIPLE = 8
SORT_CHUNK_BATCHES = 32  # batches per shuffled chunk that is sorted by length


def padded_length(longest: int) -> int:
    return PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)


def pad_batch(sequences: Sequence[np.ndarray], stats: Stats) -> dict[str, np.ndarray]:
    """Normalize and zero-pad sequences (T_i, *F) into {"frames": (B, T, *F), "lengths": (B,)}."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    t = padded_length(int(lengths.max()))
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


class BatchSequence(keras.utils.PyDataset):
    """Keras input for ``fit``/``evaluate``: (inputs, one-hot labels[, sample weights]).

    The batch order of epoch ``e`` depends only on (seed, e), so a continued run sees the
    same order an uninterrupted one would have.
    """

    def __init__(self, ds: Dataset, indices: np.ndarray, stats: Stats, batch_size: int,
                 shuffle: bool, seed: int = 0, epoch: int = 0,
                 class_weights: np.ndarray | None = None, workers: int | None = None) -> None:
        super().__init__(workers=workers or default_workers(), use_multiprocessing=False, max_queue_size=16)
        self.ds, self.indices, self.stats = ds, np.asarray(indices), stats
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.labels, self.lengths = ds.label_ids(), ds.lengths()
        self.n_classes = len(ds.classes)
        self.class_weights = class_weights
        self.epoch = epoch
        self.plan = self._plan()

    def _plan(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        batches = length_sorted_batches(self.indices, self.lengths, self.batch_size, rng)
        # Keras (TensorFlow backend) infers the input signature from the first 2 batches: a
        # time axis of equal length in both would be fixed for the whole run. So the second
        # batch is one of another padded length whenever there is one.
        padded = [padded_length(int(self.lengths[b].max())) for b in batches]
        other = next((k for k in range(1, len(batches)) if padded[k] != padded[0]), None)
        if other is not None and other != 1:
            batches[1], batches[other] = batches[other], batches[1]
        return batches

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):  # noqa: ANN204 (Keras accepts tuples of 2 or 3)
        idx = self.plan[i]
        inputs = pad_batch([self.ds.sequence(int(k)) for k in idx], self.stats)
        onehot = np.eye(self.n_classes, dtype=np.float32)[self.labels[idx]]
        if self.class_weights is None:
            return inputs, onehot
        return inputs, onehot, self.class_weights[self.labels[idx]].astype(np.float32)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.shuffle:
            self.plan = self._plan()


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
