"""Normalization statistics: computed on the training split only, or loaded and checked."""

from __future__ import annotations

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
    total = np.zeros(ds.feature_shape, dtype=np.float64)
    total_sq = np.zeros(ds.feature_shape, dtype=np.float64)
    count = 0
    for i in indices:
        x = ds.sequence(int(i)).astype(np.float64)
        total += x.sum(axis=0)
        total_sq += np.square(x).sum(axis=0)
        count += x.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    std = np.maximum(np.sqrt(var), EPSILON)
    return Stats(mean.astype(np.float32), std.astype(np.float32))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, np.asarray(array), allow_pickle=False))


def save_stats(stats: Stats, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(directory / STATS_MEAN, stats.mean)
    atomic_save_npy(directory / STATS_STD, stats.std)


def find_stats(directory: Path) -> Path | None:
    """The folder holding both statistics files: ``directory`` itself, or None."""
    if (directory / STATS_MEAN).is_file() and (directory / STATS_STD).is_file():
        return directory
    return None


def stats_problem(directory: Path, feature_shape: tuple[int, ...]) -> str | None:
    """Why the statistics in ``directory`` are unusable for this feature shape, or None."""
    try:
        load_stats(directory, feature_shape)
    except DataError as exc:
        return str(exc)
    return None


def load_stats(directory: Path, feature_shape: tuple[int, ...]) -> Stats:
    """Load wav2vec_mean.npy / wav2vec_std.npy and check shape, finiteness and std > 0."""
    arrays = []
    for name in (STATS_MEAN, STATS_STD):
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
        raise DataError(f"{directory / STATS_STD}: has zero or negative values; delete it to recompute")
    return Stats(mean, np.maximum(std, EPSILON))
