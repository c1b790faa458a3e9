"""Batches for training and inference: similar lengths together, padded, nothing else.

Frames stay in the one float16 dataset array; a batch is gathered and zero-padded from it on
the fly (no per-epoch file decoding), in the dataset's float16: that is all the host does per
batch. Normalization and every augmentation run on the device, in the model's graph
(trainer/ml/model.py). Shuffled chunks sorted by length keep padding small while the batch
order stays random; lengths are rounded up to a multiple of 8 so backends that compile per
shape (XLA, JAX) see few shapes.

The batch order of epoch ``e`` comes from (seed, e) alone, so a continued run sees exactly the
batches an uninterrupted one would have, and one continued from a position inside an epoch
trains the rest of that very plan (:meth:`BatchSequence.rest_of_epoch`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import keras
import numpy as np

from trainer.ml.dataset import Dataset

PAD_MULTIPLE = 8
SORT_CHUNK_BATCHES = 32  # batches per shuffled chunk that is sorted by length


def padded_length(longest: int) -> int:
    return PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)


def pad_batch(sequences: Sequence[np.ndarray], time_steps: int | None = None) -> dict[str, np.ndarray]:
    """Zero-pad sequences (T_i, *F) into {"frames": (B, T, *F), "lengths": (B,)}, in the
    sequences' own dtype (the dataset's float16); T is the longest length rounded up to
    PAD_MULTIPLE, or ``time_steps`` when given. The model normalizes: padding stays zero here."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    t = time_steps or padded_length(int(lengths.max()))
    dtype = np.result_type(*{s.dtype for s in sequences})
    out = np.zeros((len(sequences), t, *sequences[0].shape[1:]), dtype=dtype)
    for row, seq in zip(out, sequences, strict=True):
        row[: len(seq)] = seq
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


KerasBatch = tuple[dict[str, np.ndarray], ...]  # (inputs, one-hot labels[, sample weights])


def topped_up(idx: np.ndarray, replicas: int) -> np.ndarray:
    """``idx`` with copies of its first index added up to a multiple of ``replicas``: each of
    MirroredStrategy's replicas then gets an equal share of the batch (an uneven split fails in
    TensorFlow); the caller weighs (or drops) the added rows."""
    return np.concatenate([idx, np.repeat(idx[:1], -len(idx) % replicas)])


class BatchSequence(keras.utils.PyDataset):
    """Keras input for ``fit``/``evaluate``: (inputs, one-hot labels[, sample weights]).

    The batch order of epoch ``e`` depends only on (seed, e), so a continued run sees the same
    batches an uninterrupted one would have. Keras's ``fit`` calls ``on_epoch_end`` once as it
    starts (resetting its iterator): a sequence made at ``epoch`` (the committed epochs) trains
    the run's 1-based epoch E on plan E.
    """

    def __init__(self, ds: Dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                 epoch: int = 0, class_weights: np.ndarray | None = None, workers: int | None = None,
                 replicas: int = 1) -> None:
        super().__init__(workers=workers or default_workers(), use_multiprocessing=False, max_queue_size=16)
        self.ds, self.indices = ds, np.asarray(indices)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.labels, self.lengths = ds.label_ids(), ds.lengths()
        self.onehot = np.eye(len(ds.classes), dtype=np.float32)
        self.class_weights = class_weights
        # MirroredStrategy splits each batch across its replicas, which must get equal shares
        # (an uneven split fails in TensorFlow's gradient sum): a batch is topped up to a multiple
        # with copies of its first sequence that weigh nothing (no loss, no metric).
        self.replicas = replicas
        self.epoch = epoch
        self.plan = self._plan()  # replaced whole: a worker never sees half of two plans

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

    def __getitem__(self, i: int) -> KerasBatch:
        return self.batch(self.plan, i)

    def batch(self, plan: list[np.ndarray], i: int) -> KerasBatch:
        """Batch ``i`` of ``plan``: its sequences gathered and padded, labels, sample weights."""
        idx = plan[i]
        short = -len(idx) % self.replicas
        idx = topped_up(idx, self.replicas)
        inputs = pad_batch([self.ds.sequence(int(k)) for k in idx], padded_length(int(self.lengths[idx].max())))
        labels = self.labels[idx]
        if self.class_weights is None and self.replicas == 1:
            return inputs, self.onehot[labels]
        weights = (self.class_weights[labels] if self.class_weights is not None else np.ones(len(idx))).astype(
            np.float32)
        weights[len(idx) - short:] = 0.0
        return inputs, self.onehot[labels], weights

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.shuffle:
            self.plan = self._plan()

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
    """The batches of one epoch's plan from ``start`` on, exactly as the whole epoch has them."""

    def __init__(self, seq: BatchSequence, start: int) -> None:
        super().__init__(workers=seq.workers, use_multiprocessing=False, max_queue_size=16)
        self.seq, self.start, self.plan = seq, start, seq.plan

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __getitem__(self, i: int) -> KerasBatch:
        return self.seq.batch(self.plan, self.start + i)

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
