"""Normalization statistics: computed on the training split only, or loaded and checked."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.contract.layout import STATS_MEAN, STATS_STD
from trainer.machine.fsutil import atomic_write
from trainer.machine.readers import open_regular
from trainer.ml.dataset import Dataset
from trainer.ml.errors import DataError

# Floor for the standard deviation: a constant feature must not divide by ~0.
EPSILON = 1e-5


@dataclass(frozen=True)
class Stats:
    mean: np.ndarray  # float32, the dataset's per-frame feature shape
    std: np.ndarray

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) - self.mean) / self.std


def compute_stats(ds: Dataset, indices: np.ndarray) -> Stats:
    """Per-feature mean/std over every frame of the given (training) samples only."""
    if len(indices) == 0:
        raise DataError("cannot compute normalization statistics: the training split is empty")
    return frame_stats((ds.sequence(int(i)) for i in indices), ds.feature_shape)


def frame_stats(sequences: Iterable[np.ndarray], feature_shape: tuple[int, ...]) -> Stats:
    """Per-feature mean/std over every frame of ``sequences`` (at least one frame)."""
    total = np.zeros(feature_shape, dtype=np.float64)
    total_sq = np.zeros(feature_shape, dtype=np.float64)
    count = 0
    for seq in sequences:
        x = seq.astype(np.float64)
        total += x.sum(axis=0)
        total_sq += np.square(x).sum(axis=0)
        count += x.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.maximum(np.sqrt(var), EPSILON)
    return Stats(mean.astype(np.float32), std.astype(np.float32))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, np.asarray(array), allow_pickle=False))


# The file names of one pair of statistics: the model's input normalization by default.
Names = tuple[str, str]
MODEL_INPUT: Names = (STATS_MEAN, STATS_STD)


def save_stats(stats: Stats, directory: Path, names: Names = MODEL_INPUT) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(directory / names[0], stats.mean)
    atomic_save_npy(directory / names[1], stats.std)


def find_stats(directory: Path, names: Names = MODEL_INPUT) -> Path | None:
    """The folder holding both statistics files: ``directory`` itself, or None."""
    if all((directory / name).is_file() for name in names):
        return directory
    return None


def stats_problem(directory: Path, feature_shape: tuple[int, ...]) -> str | None:
    """Why the statistics in ``directory`` are unusable for this feature shape, or None."""
    try:
        load_stats(directory, feature_shape)
    except DataError as exc:
        return str(exc)
    return None


def load_stats(directory: Path, feature_shape: tuple[int, ...], names: Names = MODEL_INPUT) -> Stats:
    """Load wav2vec_mean.npy / wav2vec_std.npy (or the pair ``names``) and check shape,
    finiteness and std > 0."""
    arrays = []
    for name in names:
        path = directory / name
        try:
            with open_regular(path) as fh:  # a named pipe must not hang check-data
                arr = np.load(fh, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read statistics file ({exc})") from exc
        # Older scripts saved (1, D); the per-frame shape is what counts.
        while arr.ndim > len(feature_shape) and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != tuple(feature_shape) and arr.shape != tuple(feature_shape[-1:]):
            raise DataError(
                f"{path}: shape {arr.shape} does not match the features' per-frame shape "
                f"{tuple(feature_shape)}; delete it or pass other --stats-dir"
            )
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: contains NaN or Inf; delete it to recompute statistics")
        arrays.append(np.broadcast_to(arr.astype(np.float32), feature_shape).copy())
    mean, std = arrays
    if (std <= 0).any():
        raise DataError(f"{directory / names[1]}: has zero or negative values; delete it to recompute")
    return Stats(mean, np.maximum(std, EPSILON))
