"""Decoding feature files: the array each one contributes (never unpickled, never anything but a
regular file), checked and stored as float16 frames, in worker processes on many-core machines."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from trainer.machine.readers import NotRegular, open_regular
from trainer.ml.dataset import STORE_DTYPE, ProgressFn, SkipReason

ARRAY_KEYS: tuple[str, ...] = ("emb", "embedding", "features", "wav2vec")


class _NoArray(Exception):
    pass


def _choose_key(names: list[str]) -> str | None:
    for key in ARRAY_KEYS:
        if key in names:
            return key
    return names[0] if names else None


def load_array(path: Path) -> tuple[str, np.ndarray]:
    """Decode the array a feature file contributes, with the key it came from ("emb", ...,
    "first:<name>" when no known key exists, "npy" for .npy files). Never unpickles, never
    opens anything but a regular file."""
    with open_regular(path) as fh:
        if path.suffix.lower() == ".npy":
            return "npy", np.load(fh, allow_pickle=False)
        return _load_npz(fh)


def _load_npz(fh: BinaryIO) -> tuple[str, np.ndarray]:
    with zipfile.ZipFile(fh) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        key = _choose_key(names)
        if key is None:
            raise _NoArray("the .npz archive holds no array")
        with zf.open(key + ".npy") as fh:
            array = np.lib.format.read_array(fh, allow_pickle=False)
    return (key if key in ARRAY_KEYS else f"first:{key}"), array


def as_frames(arr: np.ndarray) -> np.ndarray:
    """(D,) -> (1, D); (T, D) stays; (L, T, D) -> (T, L, D) so frames come first."""
    if arr.ndim == 1:
        return arr[None, :]
    if arr.ndim == 3:
        return np.moveaxis(arr, 1, 0)
    return arr


def describe_shape(shape: tuple[int, ...]) -> str:
    """A shape as users think of it: (768,) / (T, 768) / (L=13, T, 768)."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    if len(shape) == 2:
        return f"(T, {shape[1]})"
    if len(shape) == 3:
        return f"(L={shape[0]}, T, {shape[2]})"
    return str(shape)


@dataclass(frozen=True)
class Loaded:
    """One file after decoding: its frames (float16, frames first) or why it was skipped."""

    key: str | None
    shape: str | None
    frames: np.ndarray | None
    skip: SkipReason | None = None
    detail: str = ""


def _load_one(path: Path) -> Loaded:
    """Decode, check and convert one file; every problem becomes a skip, never an error."""
    try:
        key, arr = load_array(path)
    except _NoArray as exc:
        return Loaded(None, None, None, SkipReason.NO_ARRAY, str(exc))
    except NotRegular as exc:
        return Loaded(None, None, None, SkipReason.SPECIAL_FILE, exc.strerror or "")
    except Exception as exc:  # any decoding problem means the file is unusable
        return Loaded(None, None, None, SkipReason.UNREADABLE, _short(exc))
    shape = describe_shape(arr.shape)
    if arr.dtype.kind not in "fiu":
        return Loaded(key, shape, None, SkipReason.NO_ARRAY, f"array dtype {arr.dtype} is not numeric")
    if arr.ndim == 0 or arr.ndim > 3:
        return Loaded(key, shape, None, SkipReason.BAD_SHAPE, f"shape {arr.shape}")
    if arr.size == 0:
        return Loaded(key, shape, None, SkipReason.EMPTY, f"shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        stored = as_frames(arr).astype(STORE_DTYPE)
    # Checking the stored float16 values catches NaN/Inf and float16 overflow at once.
    if not np.isfinite(stored).all():
        return Loaded(key, shape, None, SkipReason.NON_FINITE)
    return Loaded(key, shape, stored)


def _load_chunk(paths: list[str]) -> list[Loaded]:
    return [_load_one(Path(p)) for p in paths]


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:160]


# Below this many files, or with 2 cores or fewer, worker processes cost more than they save
# (measured with bench/bench_load.py); threads never help: numpy's decoding holds the GIL.
PARALLEL_MIN_FILES = 2000
CHUNK = 256


def default_workers(n_files: int) -> int:
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 or n_files < PARALLEL_MIN_FILES else min(cores, 16)


def decode_all(paths: list[str], workers: int, progress: ProgressFn | None) -> Iterator[Loaded]:
    """Decode files in chunks, in worker processes when ``workers > 1``, in order."""
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    done = 0
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # forkserver/spawn: never fork a process that may already hold TensorFlow's threads.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            for results in pool.map(_load_chunk, chunks):
                done += len(results)
                if progress is not None:
                    progress(done, len(paths))
                yield from results
        return
    for chunk in chunks:
        results = _load_chunk(chunk)
        done += len(results)
        if progress is not None:
            progress(done, len(paths))
        yield from results
