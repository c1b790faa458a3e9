"""Train/validation splits, written to split.json so resumed runs use the very same one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.machine.fsutil import atomic_write_json
from trainer.ml.dataset import Dataset
from trainer.ml.errors import DataError, UsageError

METHODS = ("random", "speaker")


@dataclass(frozen=True)
class Split:
    method: str
    seed: int
    val_fraction: float
    train: np.ndarray  # sample indices into the Dataset
    val: np.ndarray


def make_split(ds: Dataset, method: str, val_fraction: float, seed: int) -> Split:
    """Split ``ds``: ``random`` (stratified by class) or ``speaker`` (no shared speaker)."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    labels = ds.label_ids()
    if method == "random":
        val = _random_val(labels, val_fraction, seed)
    elif method == "speaker":
        val = _speaker_val(ds, labels, val_fraction, seed)
    else:
        raise UsageError(f"--split must be one of {', '.join(METHODS)}, got {method!r}")
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise DataError(
            f"{method} split of {len(labels)} samples left an empty "
            f"{'validation' if len(val_idx) == 0 else 'training'} set; add data or change "
            "--val-fraction" + (" (a speaker split needs at least 2 speakers)" if method == "speaker" else "")
        )
    return Split(method, seed, val_fraction, train_idx, val_idx)


def _random_val(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        n = len(members)
        # Every class with at least 2 samples appears on both sides.
        n_val = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        val.append(members[:n_val])
    return np.concatenate(val) if val else np.array([], dtype=np.int64)


def _speaker_val(ds: Dataset, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whole speakers go to validation, corpus by corpus, chosen greedily (in a seeded random
    order) whenever adding one brings the validation class counts closer to their targets."""
    rng = np.random.default_rng(seed)
    n_classes = len(ds.classes)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(ds.samples):
        # A file with no known speaker (label folders) is a speaker of its own.
        key = (s.corpus, s.speaker if s.speaker is not None else f"file:{s.rel}")
        groups.setdefault(key, []).append(i)
    val: list[int] = []
    for corpus in sorted({c for c, _ in groups}):
        keys = sorted(k for k in groups if k[0] == corpus)
        counts = {k: np.bincount(labels[groups[k]], minlength=n_classes) for k in keys}
        target = fraction * sum(counts.values())
        current = np.zeros(n_classes)
        for j in rng.permutation(len(keys)):
            key = keys[j]
            candidate = current + counts[key]
            if np.abs(candidate - target).sum() < np.abs(current - target).sum():
                current = candidate
                val.extend(groups[key])
    if not val and len(groups) > 1:
        # Few, large speakers: each alone overshoots the target. One speaker, the one whose size
        # is nearest the target, still beats validating on nothing.
        want = fraction * len(labels)
        nearest = min(sorted(groups), key=lambda k: abs(len(groups[k]) - want))
        val = list(groups[nearest])
    return np.array(sorted(val), dtype=np.int64)


def save_split(split: Split, ds: Dataset, path: Path) -> None:
    """split.json: method, seed, fraction and the relative paths of each side."""
    atomic_write_json(
        path,
        {
            "method": split.method,
            "seed": split.seed,
            "val_fraction": split.val_fraction,
            "train": [ds.samples[i].rel for i in split.train],
            "validation": [ds.samples[i].rel for i in split.val],
        },
    )


def load_split(path: Path, ds: Dataset) -> tuple[Split, list[str]]:
    """Re-create a saved split on ``ds``; also returns the listed files no longer usable.

    Files present now but absent from the split are left out of both sides, so a resumed
    run never trains on what it validated on before.
    """
    try:
        doc = json.loads(path.read_text())
        train_rel, val_rel = doc["train"], doc["validation"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable split file ({exc})") from exc
    index = ds.index_of()
    missing = [r for r in (*train_rel, *val_rel) if r not in index]
    train = np.array([index[r] for r in train_rel if r in index], dtype=np.int64)
    val = np.array([index[r] for r in val_rel if r in index], dtype=np.int64)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{path}: none of its {'training' if len(train) == 0 else 'validation'} "
                        f"files are usable in {ds.root}; is it the same data directory?")
    split = Split(doc.get("method", "file"), int(doc.get("seed", 0)),
                  float(doc.get("val_fraction", 0.0)), train, val)
    return split, missing
