"""Per-speaker normalization (``--normalization speaker``): each speaker's frames standardized
with that speaker's own mean and standard deviation, so what is constant about a voice (its
offset, its per-feature gain) is gone before the model sees a frame.

The rule, the same in training, ``evaluate`` and ``predict``:

- the speaker is the one the file name names (RAVDESS actor, CREMA-D id: ``corpus:id``);
- a speaker with at least ``min_files`` files among the files normalized together (the data
  directory in training and evaluate, the given files in predict) is standardized with the
  statistics of those files' frames; no label is read, so a new speaker's files can be
  normalized as they come;
- every other file (a speaker with fewer files, a file whose name names no speaker) gets the
  fallback: the training split's global statistics of the raw features.

In training it is a transform of the in-memory dataset, applied once after the split and
before the model's global statistics (which are then computed on normalized frames of the
training split): batches never see raw frames, and nothing is redone per batch. Nothing of a
validation or held-out speaker reaches training statistics: the fallback and the global
statistics come from the training split's files only, and a speaker's own statistics from that
speaker's frames only (a validation speaker is normalized as a new speaker is in prediction).

It assumes a speaker's files span the emotions: the files of one speaker that are all angry
would lose what anger shares with itself. Fewer files than ``min_files`` fall back to global
statistics for that reason too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.contract import layout
from trainer.contract.labels import label_from_path
from trainer.ml.dataset import Dataset
from trainer.ml.errors import DataError
from trainer.ml.split import Split
from trainer.ml.stats import EPSILON, Names, Stats, compute_stats, find_stats, frame_stats, load_stats, save_stats

SPEAKER, GLOBAL = "speaker", "global"
FALLBACK: Names = (layout.FALLBACK_MEAN, layout.FALLBACK_STD)
# A speaker's standard deviation is floored at this share of the global one: a feature nearly
# constant in one voice is not blown up (nor past float16's range) by dividing by ~0.
STD_FLOOR = 0.01
Log = Callable[[str], None]


def speaker_key(corpus: str, speaker: str | None) -> str | None:
    """``corpus:id``, the speaker a file name names; None when it names none."""
    return f"{corpus}:{speaker}" if speaker is not None else None


def key_of_path(path: Path) -> str | None:
    info = label_from_path(path.name)
    return speaker_key(info.corpus, info.speaker)


@dataclass(frozen=True)
class Plan:
    """Which files were normalized how: per file ``speaker`` or ``global``."""

    modes: tuple[str, ...]
    speakers: int  # speakers normalized with their own statistics
    min_files: int | None  # None: the run normalizes globally

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what evaluation reports carry (:func:`describe` says it in words)."""
        counts = Counter(self.modes)
        return {"per_speaker_files": counts[SPEAKER], "speakers": self.speakers, "global_files": counts[GLOBAL],
                "speaker_min_files": self.min_files}

    def describe(self) -> str:
        return describe(self.summary())


def describe(summary: dict[str, Any]) -> str:
    """One line for people: how many files got which statistics, and why."""
    per_speaker, rest, least = summary["per_speaker_files"], summary["global_files"], summary["speaker_min_files"]
    if least is None:
        return f"normalization: global statistics for all {rest} files (the run's --normalization global)"
    parts = [f"per speaker for {per_speaker} files of {summary['speakers']} speakers"] if per_speaker else []
    if rest:
        parts.append(f"global statistics for {rest} files (their speaker has fewer than {least} files here, "
                     "or their name names none)")
    return "normalization: " + "; ".join(parts)


def plan(keys: Sequence[str | None], min_files: int) -> tuple[Plan, dict[str, list[int]]]:
    """The plan for files of speakers ``keys``, and the positions of each speaker normalized alone."""
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            members.setdefault(key, []).append(i)
    groups = {k: v for k, v in members.items() if len(v) >= min_files}
    modes = [GLOBAL] * len(keys)
    for positions in groups.values():
        for i in positions:
            modes[i] = SPEAKER
    return Plan(tuple(modes), len(groups), min_files), groups


@dataclass(frozen=True)
class Normalization:
    """A run's host-side normalization: ``fallback`` is None when it normalizes globally (the
    model's global statistics do it all)."""

    min_files: int
    fallback: Stats | None

    def apply(self, sequences: Sequence[np.ndarray], keys: Sequence[str | None]) -> tuple[list[np.ndarray], Plan]:
        """The sequences (float32) as the run's model expects them before its global statistics."""
        if self.fallback is None:
            return [np.asarray(s, dtype=np.float32) for s in sequences], Plan((GLOBAL,) * len(sequences), 0, None)
        done, groups = plan(keys, self.min_files)
        out: list[np.ndarray | None] = [None] * len(sequences)
        for positions, stats in self._stats_of(groups, done, lambda i: sequences[i]):
            for i in positions:
                out[i] = stats.normalize(sequences[i])
        return [np.asarray(s) for s in out], done

    def apply_dataset(self, ds: Dataset) -> Plan:
        """Normalize every sample of ``ds`` in memory, once (a new float16 frames array)."""
        keys = [speaker_key(s.corpus, s.speaker) for s in ds.samples]
        if self.fallback is None:
            return Plan((GLOBAL,) * len(keys), 0, None)
        done, groups = plan(keys, self.min_files)
        frames = np.empty(ds.frames.shape, dtype=ds.frames.dtype)
        limit = float(np.finfo(frames.dtype).max) if frames.dtype.kind == "f" else None
        for positions, stats in self._stats_of(groups, done, ds.sequence):
            for i in positions:
                s = ds.samples[i]
                x = stats.normalize(ds.sequence(i))
                frames[s.offset : s.offset + s.length] = x if limit is None else np.clip(x, -limit, limit)
        ds.frames = frames
        return done

    def _stats_of(self, groups: dict[str, list[int]], done: Plan, sequence: Callable[[int], np.ndarray]):
        """(positions, statistics) pairs: each speaker's own, then the fallback's files."""
        assert self.fallback is not None
        floor = np.maximum(STD_FLOOR * self.fallback.std, EPSILON)
        for positions in groups.values():
            own = frame_stats((sequence(i) for i in positions), self.fallback.mean.shape)
            yield positions, Stats(own.mean, np.maximum(own.std, floor).astype(np.float32))
        rest = [i for i, mode in enumerate(done.modes) if mode == GLOBAL]
        if rest:
            yield rest, self.fallback


def normalize_training_data(ds: Dataset, split: Split, min_files: int, own: Path, given: Path | None,
                            log: Log) -> Normalization:
    """Training's per-speaker normalization of ``ds`` (in place), its fallback statistics taken
    from this run's stats/ or ``given`` (an extended run's parent's), else computed on the
    training split and saved into ``own``."""
    source = next((d for d in (own, given) if d is not None and find_stats(d, FALLBACK)), None)
    if source is None and given is not None:
        raise DataError(f"--stats-dir {given}: no {layout.FALLBACK_MEAN} / {layout.FALLBACK_STD} there: per-speaker "
                        "normalization needs the statistics of a run trained with it (or --normalization global)")
    if source is None:
        fallback = compute_stats(ds, split.train)
        save_stats(fallback, own, FALLBACK)
    else:
        fallback = load_stats(source, ds.feature_shape, FALLBACK)
        if source != own:
            save_stats(fallback, own, FALLBACK)
    norm = Normalization(min_files, fallback)
    log(norm.apply_dataset(ds).describe())
    return norm


def run_normalization(cfg: Any, run_dir: Path, feature_shape: tuple[int, ...]) -> Normalization:
    """The normalization a run's model was trained with: its config (a TrainConfig) and stats/."""
    if cfg.normalization != SPEAKER:
        return Normalization(cfg.speaker_min_files, None)
    return Normalization(cfg.speaker_min_files, load_stats(run_dir / layout.STATS_DIR, feature_shape, FALLBACK))
