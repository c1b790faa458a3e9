"""Decoding feature files: the array each one contributes (never unpickled, never anything but a
regular file), checked and cast straight into the float16 frame store (trainer/ml/framestore.py),
in worker processes on many-core machines.

Each file is read once, whole; the layouts numpy writes are parsed from those bytes
(trainer/ml/npyread.py), anything else goes to numpy and zipfile themselves (``load_array``),
whose messages are the diagnostics check-data shows."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from trainer.machine.readers import NotRegular, open_regular
from trainer.ml.dataset import ProgressFn, SkipReason
from trainer.ml.framestore import FrameStores, Part
from trainer.ml.npyread import npy_array, npz_array

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
            array = np.load(fh, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # np.load opens a zip archive whatever its name
                array.close()
                raise ValueError("a .npz archive named .npy")
            return "npy", array
        return _load_npz(fh)


def _key_name(key: str) -> str:
    return key if key in ARRAY_KEYS else f"first:{key}"


def read_array(path: str) -> tuple[str, np.ndarray]:
    """``load_array``'s answer, from one read of the file: the plain layouts are parsed from
    its bytes; for anything else (or anything wrong) numpy and zipfile decide, and explain."""
    with open_regular(path) as fh:
        data = fh.read()
    if os.path.splitext(path)[1].lower() == ".npy":
        array = npy_array(data)
        if array is not None:
            return "npy", array
    else:
        found = npz_array(data, _choose_key)
        if found is not None:
            return _key_name(found[0]), found[1]
    return load_array(Path(path))


def _load_npz(fh: BinaryIO) -> tuple[str, np.ndarray]:
    with zipfile.ZipFile(fh) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        key = _choose_key(names)
        if key is None:
            raise _NoArray("the .npz archive holds no array")
        with zf.open(key + ".npy") as fh:
            array = np.lib.format.read_array(fh, allow_pickle=False)
    return _key_name(key), array


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
    """One file after decoding: where its frames went (float16, frames first, in the store of
    its per-frame shape) or why it was skipped."""

    key: str | None
    shape: str | None
    frame_shape: tuple[int, ...] | None = None
    offset: int = 0
    length: int = 0
    skip: SkipReason | None = None
    detail: str = ""


def _finite(frames: np.ndarray) -> bool:
    """No NaN, Inf or float16 overflow: a float16 is one of those exactly when its exponent
    bits are all set (an integer test, cheaper than np.isfinite on float16)."""
    bits = frames.view(np.uint16)
    return not np.any(np.bitwise_and(bits, 0x7C00) == 0x7C00)


def _load_one(path: str, stores: FrameStores) -> Loaded:
    """Decode, check and store one file; every problem becomes a skip, never an error."""
    try:
        key, arr = read_array(path)
    except _NoArray as exc:
        return Loaded(None, None, skip=SkipReason.NO_ARRAY, detail=str(exc))
    except NotRegular as exc:
        return Loaded(None, None, skip=SkipReason.SPECIAL_FILE, detail=exc.strerror or "")
    except Exception as exc:  # any decoding problem means the file is unusable
        return Loaded(None, None, skip=SkipReason.UNREADABLE, detail=_short(exc))
    shape = describe_shape(arr.shape)
    if arr.dtype.kind not in "fiu":
        return Loaded(key, shape, skip=SkipReason.NO_ARRAY, detail=f"array dtype {arr.dtype} is not numeric")
    if arr.ndim == 0 or arr.ndim > 3:
        return Loaded(key, shape, skip=SkipReason.BAD_SHAPE, detail=f"shape {arr.shape}")
    if arr.size == 0:
        return Loaded(key, shape, skip=SkipReason.EMPTY, detail=f"shape {arr.shape}")
    frames = as_frames(arr)
    frame_shape = tuple(frames.shape[1:])
    store = stores.store(frame_shape, arr.itemsize * (arr.size // len(frames)))
    slot = store.slot(len(frames))
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(slot, frames, casting="unsafe")
    # Checking the stored float16 values catches NaN/Inf and float16 overflow at once; a bad
    # file's rows are not committed, the next file overwrites them.
    if not _finite(slot):
        return Loaded(key, shape, skip=SkipReason.NON_FINITE)
    return Loaded(key, shape, frame_shape, store.commit(len(frames)), len(frames))


def _load_chunk(paths: list[str], sizes: list[int], stores: FrameStores) -> list[Loaded]:
    results = []
    for path, size in zip(paths, sizes, strict=True):
        results.append(_load_one(path, stores))
        stores.bytes_left -= size
    return results


def _load_chunk_apart(paths: list[str], sizes: list[int]) -> tuple[list[Loaded], list[Part]]:
    """A worker's chunk: its files in stores of its own, sent back whole."""
    stores = FrameStores(sum(sizes))
    return _load_chunk(paths, sizes, stores), stores.parts()


def _merge(results: list[Loaded], parts: list[Part], stores: FrameStores) -> list[Loaded]:
    """A worker's chunk moved into the main stores, its offsets shifted to match."""
    base = {shape: stores.store(shape, source_frame_bytes).append(a) for shape, source_frame_bytes, a in parts}
    return [replace(r, offset=r.offset + base[r.frame_shape]) if r.frame_shape is not None else r
            for r in results]


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


def decode_all(paths: list[str], sizes: list[int], workers: int, progress: ProgressFn | None,
               stores: FrameStores) -> Iterator[Loaded]:
    """Decode files in chunks into ``stores``, in worker processes when ``workers > 1``, in
    order. ``sizes``: the files' byte counts, from which the stores are reserved."""
    chunks = [(paths[i : i + CHUNK], sizes[i : i + CHUNK]) for i in range(0, len(paths), CHUNK)]
    done = 0
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # forkserver/spawn: never fork a process that may already hold TensorFlow's threads.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            for (chunk_paths, chunk_sizes), (results, arrays) in zip(
                    chunks, pool.map(_load_chunk_apart, *zip(*chunks, strict=True)), strict=True):
                done += len(chunk_paths)
                if progress is not None:
                    progress(done, len(paths))
                yield from _merge(results, arrays, stores)
                stores.bytes_left -= sum(chunk_sizes)
        return
    for chunk_paths, chunk_sizes in chunks:
        results = _load_chunk(chunk_paths, chunk_sizes, stores)
        done += len(results)
        if progress is not None:
            progress(done, len(paths))
        yield from results
