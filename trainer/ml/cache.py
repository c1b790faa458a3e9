"""The loader's cache: a decoded data directory as one memory-mapped float16 array and an index,
keyed by the files' names, sizes and mtimes (and the class list), so the next run over the same
files decodes nothing. Written beside and renamed into place: a reader never sees half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from trainer.ml.dataset import STORE_DTYPE, Dataset, Sample, ScanInfo, Skipped, SkipReason
from trainer.ml.discover import Candidate

# Bump when what the loader stores changes, so old caches are not trusted.
LOADER_VERSION = 1
CACHE_ENV = "ORCH_TRAINER_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "orch-trainer")


_INDEX = "index.json"
_FRAMES = "frames.npy"


def cache_entry(
    cache_root: Path, root: Path, classes: tuple[str, ...], candidates: list[Candidate]
) -> Path:
    """The cache folder for exactly this file list (names, sizes, mtimes) and class list."""
    # File names are bytes: os.fsencode gives back exactly those of a name that is not UTF-8.
    root_key = hashlib.sha256(os.fsencode(root)).hexdigest()[:12]
    h = hashlib.sha256(json.dumps([LOADER_VERSION, str(root), list(classes)]).encode())
    for c in candidates:
        h.update(os.fsencode(c.rel) + f"\0{c.size}\0{c.mtime_ns}\n".encode())
    return cache_root / f"{root_key}-{h.hexdigest()[:20]}"


def new_tmp_entry(entry: Path) -> Path:
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_frames(tmp_entry: Path, frames: np.ndarray) -> None:
    """The frame array as a .npy file, in one sequential write."""
    with open(tmp_entry / _FRAMES, "wb") as fh:
        np.lib.format.write_array(fh, np.ascontiguousarray(frames, dtype=STORE_DTYPE), allow_pickle=False)


def commit_cache(ds: Dataset, tmp_entry: Path, entry: Path) -> Dataset:
    """Write the index, rename the temp folder into place, drop older caches of this root."""
    index = {
        "loader_version": LOADER_VERSION,
        "root": str(ds.root),
        "classes": list(ds.classes),
        "feature_shape": list(ds.feature_shape),
        "samples": [vars(s) for s in ds.samples],  # asdict is 10x slower
        "skipped": [[s.rel, s.reason.value, s.detail] for s in ds.skipped],
        "patterns": ds.scan.patterns,
        "array_keys": ds.scan.array_keys,
        "shapes": ds.scan.shapes,
    }
    (tmp_entry / _INDEX).write_text(json.dumps(index))
    try:
        os.rename(tmp_entry, entry)
    except OSError:  # another process cached the same data first: theirs is as good
        shutil.rmtree(tmp_entry, ignore_errors=True)
        ds.cache = "miss"
        return ds
    prefix = entry.name.split("-", 1)[0] + "-"
    for old in entry.parent.iterdir():
        if old.name.startswith(prefix) and old != entry and ".tmp-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    ds.frames = np.load(entry / _FRAMES, mmap_mode="r")
    ds.cache = "miss"
    return ds


def read_cache(
    entry: Path, root: Path, classes: tuple[str, ...], scan: ScanInfo
) -> Dataset | None:
    """The cached dataset, or None when there is none or it is unreadable."""
    try:
        index = json.loads((entry / _INDEX).read_text())
        if index.get("loader_version") != LOADER_VERSION:
            return None
        frames = np.load(entry / _FRAMES, mmap_mode="r")
        samples = [Sample(**s) for s in index["samples"]]
        skipped = [Skipped(rel, SkipReason(reason), detail) for rel, reason, detail in index["skipped"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    scan.patterns = index["patterns"]
    scan.array_keys = index["array_keys"]
    scan.shapes = index["shapes"]
    feature_shape = tuple(index["feature_shape"])
    return Dataset(root, classes, feature_shape, samples, skipped, frames, scan, cache="hit")
