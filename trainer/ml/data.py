"""Feature files -> one compact, validated in-memory (or memory-mapped) dataset.

Walk the folder (trainer/ml/discover.py), label each file by its name, and decode each file
once (trainer/ml/arrays.py) straight into a single float16 array (trainer/ml/framestore.py):
memory holds one copy of the data. With a cache directory that array is written into the cache
and memory-mapped from there (trainer/ml/cache.py), and the next run over the same files
decodes nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from trainer.contract.labels import DEFAULT_CLASSES, label_from_path
from trainer.ml.arrays import Loaded, decode_all, default_workers
from trainer.ml.cache import cache_entry, commit_cache, default_cache_dir, new_tmp_entry, read_cache, write_frames
from trainer.ml.dataset import Dataset, ProgressFn, Sample, ScanInfo, Skipped, SkipReason
from trainer.ml.discover import Candidate, walk
from trainer.ml.errors import DataError
from trainer.ml.framestore import FrameStores

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
    size = {c.rel: c.size for c in candidates}
    paths = [os.path.join(root, rel) for rel, _ in labelled]
    sizes = [size[rel] for rel, _ in labelled]
    stores = FrameStores(sum(sizes))
    n_workers = workers if workers is not None else default_workers(len(paths))
    loaded = list(decode_all(paths, sizes, n_workers, progress, stores))
    feature_shape = _majority_shape(loaded, scan)
    samples = _samples(labelled, loaded, feature_shape, skipped)
    frames = stores.array(feature_shape)
    stores.by_shape.clear()  # the other shapes' frames are not kept
    skipped.sort(key=lambda s: s.rel)
    ds = Dataset(root, classes, feature_shape, samples, skipped, frames, scan)
    if entry is not None and samples:
        tmp_entry = new_tmp_entry(entry)
        write_frames(tmp_entry, frames)
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
    shapes = Counter(item.frame_shape for item in loaded if item.frame_shape is not None)
    return tuple(shapes.most_common(1)[0][0]) if shapes else ()


def _samples(labelled: Labelled, loaded: list[Loaded], feature_shape: tuple[int, ...],
             skipped: list[Skipped]) -> list[Sample]:
    """The decoded files of the majority shape, in order (so their frames are contiguous in
    its store); the others are skipped."""
    samples: list[Sample] = []
    for (rel, info), item in zip(labelled, loaded, strict=True):
        if item.frame_shape is None:
            skipped.append(Skipped(rel, item.skip or SkipReason.UNREADABLE, item.detail))
        elif item.frame_shape != feature_shape:
            detail = f"per-frame shape {item.frame_shape} vs majority {feature_shape}"
            skipped.append(Skipped(rel, SkipReason.WRONG_DIM, detail))
        else:
            samples.append(Sample(rel, info.label, info.corpus, info.speaker, item.offset, item.length))
    return samples
