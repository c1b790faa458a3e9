"""Emotion labels, corpus and speaker from a feature file's path (pure Python, no numpy).

RAVDESS:  ravdess_<modality>-<channel>-<emotion>-<intensity>-<statement>-<repetition>-<actor>
CREMA-D:  cremad_<actor>_<sentence>_<EMO>_<level>
Folders:  a file below a folder named after an emotion (``happy/xyz.npz``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

# Every emotion the corpora know, in RAVDESS code order.
ALL_EMOTIONS: tuple[str, ...] = (
    "neutral", "calm", "happy", "sad", "angry", "fear", "disgust", "surprise",
)
# The default class list: RAVDESS "surprise" has no CREMA-D counterpart, so it is left out.
DEFAULT_CLASSES: tuple[str, ...] = ALL_EMOTIONS[:7]

RAVDESS_EMOTIONS: dict[str, str] = {f"{i + 1:02d}": name for i, name in enumerate(ALL_EMOTIONS)}
CREMAD_EMOTIONS: dict[str, str] = {
    "NEU": "neutral", "HAP": "happy", "SAD": "sad", "ANG": "angry", "FEA": "fear", "DIS": "disgust",
}
# Folder names that mean an emotion (common spellings included).
FOLDER_ALIASES: dict[str, str] = {
    **{name: name for name in ALL_EMOTIONS},
    "fearful": "fear", "disgusted": "disgust", "surprised": "surprise", "anger": "angry",
    "happiness": "happy", "sadness": "sad",
}

# The corpus prefix is optional so original file names (03-01-05-...) are recognised too.
_RAVDESS = re.compile(
    r"^(?:ravdess[_-])?(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})(?:\D|$)",
    re.IGNORECASE,
)
_CREMAD = re.compile(
    r"^(?:crema-?d[_-])?(\d{4})_([a-z]{3})_([a-z]{3})_([a-z]{2})(?:[^a-z]|$)", re.IGNORECASE
)


@dataclass(frozen=True)
class NameInfo:
    """What a path says about its sample; ``label`` is None when nothing was recognised."""

    label: str | None
    corpus: str  # "ravdess" | "cremad" | "folder" | "unknown"
    speaker: str | None
    pattern: str  # which rule matched: "ravdess", "cremad", "folder" or "none"
    code: str | None = None  # the raw emotion code, for messages about unknown codes


def parse_name(stem: str) -> NameInfo | None:
    """Parse a file stem against the RAVDESS and CREMA-D patterns (case-insensitive)."""
    m = _RAVDESS.match(stem)
    if m:
        code = m.group(3)
        return NameInfo(RAVDESS_EMOTIONS.get(code), "ravdess", m.group(7), "ravdess", code)
    m = _CREMAD.match(stem)
    if m:
        code = m.group(3).upper()
        return NameInfo(CREMAD_EMOTIONS.get(code), "cremad", m.group(1), "cremad", code)
    return None


def label_from_path(rel_path: str | PurePath) -> NameInfo:
    """Label a path relative to the data root: the file name first, then the nearest folder."""
    path = PurePath(rel_path)
    stem = path.name.split(".", 1)[0]
    info = parse_name(stem)
    if info is not None:
        return info
    for folder in reversed(path.parts[:-1]):
        label = FOLDER_ALIASES.get(folder.lower())
        if label is not None:
            return NameInfo(label, "folder", None, "folder", folder)
    return NameInfo(None, "unknown", None, "none")


class ClassListError(ValueError):
    """A class list the trainer cannot use; the message says why."""


def parse_classes(text: str | None) -> tuple[str, ...]:
    """Parse a comma-separated class list ("neutral,happy,sad"); None gives the default."""
    if text is None or not text.strip():
        return DEFAULT_CLASSES
    classes = tuple(c.strip().lower() for c in text.split(",") if c.strip())
    unknown = [c for c in classes if c not in ALL_EMOTIONS]
    if unknown:
        raise ClassListError(f"unknown class {unknown[0]!r}; choose from {', '.join(ALL_EMOTIONS)}")
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ClassListError("give at least two distinct class names")
    return classes
