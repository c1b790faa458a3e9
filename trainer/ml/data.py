"""Feature files -> one compact, validated in-memory (or memory-mapped) dataset.

Walk the folder (trainer/ml/discover.py), label each file by its name, decode each file once
(trainer/ml/arrays.py), and move the usable ones into a single float16 array, which with a cache
directory is a ``.npy`` memmap inside the cache (trainer/ml/cache.py): memory holds one copy of
the data, and the next run over the same files decodes nothing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from trainer.contract.labels import DEFAULT_CLASSES, label_from_path
from trainer.ml.arrays import Loaded, decode_all, default_workers
from trainer.ml.cache import allocate, cache_entry, commit_cache, default_cache_dir, new_tmp_entry, read_cache
from trainer.ml.dataset import Dataset, ProgressFn, Sample, ScanInfo, Skipped, SkipReason
from trainer.ml.discover import Candidate, walk
from trainer.ml.errors import DataError

Labelled = list[tuple[str, Any]]  # (relative path, NameInfo) of the files whose name gives a label of the class list


def load_dataset(
    data_dir: str | Path,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    workers: int | None = None,
) -> Dataset:
    """Discover, label, validate and load every feature file below ``data_dir``.

    Bad files are skipped and recorded with a reason; only a missing directory raises.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    walked = walk(root)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = cache_entry(cache_root, root, classes, walked.candidates) if use_cache else None
    ds = read_cache(entry, root, classes, walked.scan) if entry is not None else None
    if ds is None:
        ds = _build(root, classes, walked.candidates, walked.scan, entry, progress, workers)
    # What the walk left out is seen afresh every time (it is not part of the cache key).
    ds.skipped = sorted(ds.skipped + walked.skipped, key=lambda s: s.rel)
    return ds


def _build(root: Path, classes: tuple[str, ...], candidates: list[Candidate], scan: ScanInfo, entry: Path | None,
           progress: ProgressFn | None, workers: int | None) -> Dataset:
    skipped: list[Skipped] = []
    labelled = _label(candidates, classes, scan, skipped)
    # One decode per file; the float16 pieces are the only copy until they move below.
    paths = [str(root / rel) for rel, _ in labelled]
    loaded = list(decode_all(paths, workers if workers is not None else default_workers(len(paths)), progress))
    feature_shape = _majority_shape(loaded, scan)
    keep = _usable(labelled, loaded, feature_shape, skipped)
    tmp_entry = new_tmp_entry(entry) if entry is not None and keep else None
    samples, frames = _pack(labelled, loaded, keep, allocate(tmp_entry, (_frames_in(loaded, keep), *feature_shape)))
    skipped.sort(key=lambda s: s.rel)
    ds = Dataset(root, classes, feature_shape, samples, skipped, frames, scan)
    if tmp_entry is not None and entry is not None:
        ds = commit_cache(ds, tmp_entry, entry)
    return ds


def _label(candidates: list[Candidate], classes: tuple[str, ...], scan: ScanInfo, skipped: list[Skipped]) -> Labelled:
    """The candidates whose name gives a label of the class list; the others are skipped."""
    patterns: Counter[str] = Counter()
    labelled: Labelled = []
    for cand in candidates:
        info = label_from_path(cand.rel)
        patterns[info.pattern] += 1
        if info.label is None:
            detail = f"emotion code {info.code!r} is unknown" if info.code else ""
            skipped.append(Skipped(cand.rel, SkipReason.UNRECOGNIZED_NAME, detail))
        elif info.label not in classes:
            skipped.append(Skipped(cand.rel, SkipReason.LABEL_NOT_IN_CLASSES, info.label))
        else:
            labelled.append((cand.rel, info))
    scan.patterns = dict(patterns)
    return labelled


def _majority_shape(loaded: list[Loaded], scan: ScanInfo) -> tuple[int, ...]:
    """The per-frame shape most decoded files have (and what check-data shows of keys and shapes)."""
    scan.array_keys = dict(Counter(item.key for item in loaded if item.key is not None))
    scan.shapes = dict(Counter(item.shape for item in loaded if item.shape is not None))
    shapes = Counter(item.frames.shape[1:] for item in loaded if item.frames is not None)
    return tuple(shapes.most_common(1)[0][0]) if shapes else ()


def _usable(labelled: Labelled, loaded: list[Loaded], feature_shape: tuple[int, ...],
            skipped: list[Skipped]) -> list[int]:
    """The indices of the decoded files of the majority shape; the others are skipped."""
    keep: list[int] = []
    for i, ((rel, _info), item) in enumerate(zip(labelled, loaded, strict=True)):
        if item.frames is None:
            skipped.append(Skipped(rel, item.skip or SkipReason.UNREADABLE, item.detail))
        elif item.frames.shape[1:] != feature_shape:
            detail = f"per-frame shape {item.frames.shape[1:]} vs majority {feature_shape}"
            skipped.append(Skipped(rel, SkipReason.WRONG_DIM, detail))
        else:
            keep.append(i)
    return keep


def _frames_in(loaded: list[Loaded], keep: list[int]) -> int:
    return sum(len(loaded[i].frames) for i in keep)  # type: ignore[arg-type]


_DROPPED = Loaded(None, None, None)


def _pack(labelled: Labelled, loaded: list[Loaded], keep: list[int],
          frames: np.ndarray) -> tuple[list[Sample], np.ndarray]:
    """Move each kept piece into its slice of the single frame array, dropping it as we go, so
    memory holds one copy of the data (the target's pages only exist once written)."""
    samples: list[Sample] = []
    offset = 0
    for i in keep:
        piece = loaded[i].frames
        assert piece is not None
        rel, info = labelled[i]
        frames[offset : offset + len(piece)] = piece
        loaded[i] = _DROPPED
        samples.append(Sample(rel, info.label, info.corpus, info.speaker, offset, len(piece)))
        offset += len(piece)
    return samples, frames
