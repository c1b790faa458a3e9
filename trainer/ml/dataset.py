"""What a loaded data directory is: its usable samples (frames stored once, contiguously), what
was skipped and why, and what the walk saw (for check-data). The loader is trainer/ml/data.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from trainer.ml.errors import DataError

STORE_DTYPE = np.float16  # wav2vec features are O(1): float16 halves memory at no real cost
ProgressFn = Callable[[int, int], None]


class SkipReason(str, Enum):
    """Why a feature file was left out; the value is what reports and JSON show."""

    UNREADABLE = "unreadable"
    NO_ARRAY = "no_array"
    EMPTY = "empty"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    WRONG_DIM = "wrong_dim"
    UNRECOGNIZED_NAME = "unrecognized_name"
    LABEL_NOT_IN_CLASSES = "label_not_in_classes"
    # What the folder walk finds besides regular files (never opened):
    SYMLINK_LOOP = "symlink_loop"
    DANGLING_LINK = "dangling_link"
    SPECIAL_FILE = "special_file"
    LINKED_FOLDER = "linked_folder"
    UNREADABLE_FOLDER = "unreadable_folder"

    @property
    def description(self) -> str:
        return _SKIP_DESCRIPTIONS[self]


_SKIP_DESCRIPTIONS = {
    SkipReason.UNREADABLE: "cannot be read (corrupt, truncated or not a numpy file)",
    SkipReason.NO_ARRAY: "no numeric array inside",
    SkipReason.EMPTY: "the array is empty",
    SkipReason.BAD_SHAPE: "the array is not (D,), (T, D) or (L, T, D)",
    SkipReason.NON_FINITE: "NaN or Inf values (or values beyond float16 range)",
    SkipReason.WRONG_DIM: "feature shape differs from the majority of files",
    SkipReason.UNRECOGNIZED_NAME: "name matches no RAVDESS/CREMA-D pattern and no label folder",
    SkipReason.LABEL_NOT_IN_CLASSES: "label is not in the class list",
    SkipReason.SYMLINK_LOOP: "a symbolic link that loops back on itself",
    SkipReason.DANGLING_LINK: "a symbolic link to nothing (its target is gone)",
    SkipReason.SPECIAL_FILE: "a named pipe, device or socket, not a regular file (never opened)",
    SkipReason.LINKED_FOLDER: "a symbolic link to a folder: not followed (link the files, or give the folder itself)",
    SkipReason.UNREADABLE_FOLDER: "a folder that cannot be listed (permissions): its files are left out",
}


@dataclass(frozen=True)
class Sample:
    """One usable utterance: its frames are ``frames[offset : offset + length]``."""

    rel: str
    label: str
    corpus: str
    speaker: str | None
    offset: int
    length: int


@dataclass(frozen=True)
class Skipped:
    rel: str
    reason: SkipReason
    detail: str = ""


@dataclass
class ScanInfo:
    """What the directory walk saw, before any array was read (for check-data)."""

    files_by_kind: dict[str, int] = field(default_factory=dict)
    links: int = 0  # feature files reached through a symbolic link (followed, counted above too)
    patterns: dict[str, int] = field(default_factory=dict)
    array_keys: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)


@dataclass
class Dataset:
    """All usable samples of a data directory, their frames stored once, contiguously."""

    root: Path
    classes: tuple[str, ...]
    feature_shape: tuple[int, ...]
    samples: list[Sample]
    skipped: list[Skipped]
    frames: np.ndarray  # (total_frames, *feature_shape), float16
    scan: ScanInfo
    cache: str = "off"  # "off" | "miss" (built now) | "hit" (memory-mapped from the cache)

    def __len__(self) -> int:
        return len(self.samples)

    def sequence(self, i: int) -> np.ndarray:
        s = self.samples[i]
        return self.frames[s.offset : s.offset + s.length]

    def label_ids(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        return np.array([s.length for s in self.samples], dtype=np.int64)

    def index_of(self) -> dict[str, int]:
        return {s.rel: i for i, s in enumerate(self.samples)}


def require_samples(ds: Dataset) -> None:
    """Raise a one-line DataError when nothing in the directory is usable."""
    if ds.samples:
        return
    n = sum(ds.scan.files_by_kind.get(k, 0) for k in ("npz", "npy"))
    reasons = Counter(s.reason.value for s in ds.skipped).most_common(2)
    why = ", ".join(f"{count} {reason}" for reason, count in reasons)
    if n == 0:
        # A linked or unreadable folder, or links to nothing, may be where the files are.
        left_out = f" (left out: {why})" if why else ""
        raise DataError(
            f"no .npz/.npy feature files found under {ds.root}{left_out}; "
            "check the path (python -m trainer check-data DIR shows what is there)"
        )
    raise DataError(
        f"no usable feature files under {ds.root}: all {n} were skipped ({why}); "
        f"run python -m trainer check-data {ds.root} for details"
    )
