"""A SYNTHETIC wav2vec-like feature set for demos, tests and benchmarks (not real speech).

File names follow the real corpora (RAVDESS and CREMA-D), class proportions mimic them
(calm is ~7x rarer than the others; RAVDESS surprise is present and skipped by default).
Each class has a direction in feature space, bent per speaker. The emotion shows as a weak
mean shift plus bursts of random sign along that direction: the bursts raise variance
without moving the mean, so a linear model on mean-pooled features sees only part of the
signal, and the per-speaker bend makes unseen speakers harder than seen ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.labels import ALL_EMOTIONS, CREMAD_EMOTIONS

MARKER = "SYNTHETIC_DATA.txt"
_CREMAD_CODE = {name: code for code, name in CREMAD_EMOTIONS.items()}
_CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
_CREMAD_LEVELS = ("LO", "MD", "HI", "XX")
# Relative class frequencies of the real corpora.
_RAVDESS_WEIGHTS = {"neutral": 0.5} | {e: 1.0 for e in ALL_EMOTIONS[1:]}
_CREMAD_WEIGHTS = {"neutral": 0.86} | {e: 1.0 for e in ("happy", "sad", "angry", "fear", "disgust")}
_RAVDESS_SHARE = 0.16
# The signal's knobs (in units of the per-frame noise's standard deviation).
BEND = 0.7  # how far each speaker bends a class direction, relative to the shared prototype
SPEAKER_OFFSET = 0.6  # per-speaker constant shift of every feature
MEAN_SHIFT = 0.25  # weak shift along the class direction: what mean pooling sees
BURST_P, BURST_AMP = 0.5, 3.0  # share of frames with a burst of random sign along it, its size


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    files: int
    by_corpus_label: dict[str, dict[str, int]]
    speakers: dict[str, int]


def synth(
    out_dir: Path,
    n: int = 1000,
    seed: int = 0,
    dim: int = 768,
    min_frames: int = 20,
    max_frames: int = 60,
    dtype: str = "float32",
) -> SynthSummary:
    """Write ``n`` synthetic feature files (.npz with varied keys, and .npy) to ``out_dir``."""
    if n < 1 or dim < 2 or not 1 <= min_frames <= max_frames:
        raise ValueError("need n >= 1, dim >= 2 and 1 <= min_frames <= max_frames")
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_ravdess = round(n * _RAVDESS_SHARE)
    speakers = {
        "ravdess": [f"{a:02d}" for a in range(1, 1 + min(24, max(2, n_ravdess // 30)))],
        "cremad": [str(1001 + a) for a in range(min(91, max(3, (n - n_ravdess) // 60)))],
    }
    prototypes = _unit(rng.standard_normal((len(ALL_EMOTIONS), dim)))
    # Calm is a quieter neutral: the pair real models confuse most.
    prototypes[1] = _unit(prototypes[0] + 0.8 * prototypes[1])
    speaker_offsets = {s: SPEAKER_OFFSET * rng.standard_normal(dim) for c in speakers for s in speakers[c]}
    speaker_bends = {s: _unit(rng.standard_normal((len(ALL_EMOTIONS), dim)))
                     for c in speakers for s in speakers[c]}

    counts: dict[str, Counter[str]] = {"ravdess": Counter(), "cremad": Counter()}
    used: set[str] = set()
    for i in range(n):
        corpus = "ravdess" if i < n_ravdess else "cremad"
        weights = _RAVDESS_WEIGHTS if corpus == "ravdess" else _CREMAD_WEIGHTS
        labels = list(weights)
        p = np.array([weights[e] for e in labels])
        label = labels[rng.choice(len(labels), p=p / p.sum())]
        speaker = speakers[corpus][rng.integers(len(speakers[corpus]))]
        name = _unique(_file_name(rng, corpus, label, speaker), used)
        k = ALL_EMOTIONS.index(label)
        direction = _unit(prototypes[k] + BEND * speaker_bends[speaker][k])
        frames = _frames(rng, direction, speaker_offsets[speaker],
                         int(rng.integers(min_frames, max_frames + 1)), dim)
        _write(out_dir / name, frames.astype(dtype), i)
        counts[corpus][label] += 1
    (out_dir / MARKER).write_text(
        "SYNTHETIC DATA. These files were written by `python -m trainer synth` for demos and\n"
        "tests. They mimic the names and shapes of wav2vec features of RAVDESS and CREMA-D but\n"
        "contain generated numbers, not features of real speech.\n"
    )
    return SynthSummary(
        out_dir, n, {c: dict(sorted(v.items())) for c, v in counts.items()},
        {c: len(s) for c, s in speakers.items()},
    )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _frames(rng: np.random.Generator, direction: np.ndarray, offset: np.ndarray, t: int,
            dim: int) -> np.ndarray:
    x = rng.standard_normal((t, dim)) + offset
    x += MEAN_SHIFT * direction
    bursts = rng.random(t) < BURST_P
    signs = rng.choice((-BURST_AMP, BURST_AMP), size=t)
    x += (bursts * signs)[:, None] * direction  # variance only: what it cannot
    return x


def _file_name(rng: np.random.Generator, corpus: str, label: str, speaker: str) -> str:
    if corpus == "ravdess":
        emotion = ALL_EMOTIONS.index(label) + 1
        intensity = 1 if label == "neutral" else int(rng.integers(1, 3))
        statement, repetition = rng.integers(1, 3, size=2)
        return f"ravdess_03-01-{emotion:02d}-{intensity:02d}-{statement:02d}-{repetition:02d}-{speaker}"
    sentence = _CREMAD_SENTENCES[rng.integers(len(_CREMAD_SENTENCES))]
    level = "XX" if label == "neutral" else _CREMAD_LEVELS[rng.integers(len(_CREMAD_LEVELS))]
    return f"cremad_{speaker}_{sentence}_{_CREMAD_CODE[label]}_{level}"


def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_take{k}"
    used.add(name)
    return name


def _write(stem_path: Path, frames: np.ndarray, i: int) -> None:
    # Every key the loader knows, and plain .npy, as real feature dumps vary.
    kind = i % 10
    if kind == 9:
        np.save(stem_path.with_suffix(".npy"), frames)
        return
    key = {6: "embedding", 7: "features", 8: "wav2vec"}.get(kind, "emb")
    np.savez(stem_path.with_suffix(".npz"), **{key: frames})
