"""A SYNTHETIC wav2vec-like feature set for demos, tests and benchmarks (not real speech).

File names follow the real corpora (RAVDESS and CREMA-D), class proportions mimic them
(calm, a RAVDESS-only class, is ~7x rarer than the others in the mix; RAVDESS surprise is
present and skipped by default). The numbers show what makes real frozen features hard:

- **more speaker than emotion information**: every speaker has a constant offset and its own
  directions of frame-to-frame variation (its voice), both larger than the emotion;
- **a speaker effect that is partly multiplicative**: a per-feature gain on everything the
  speaker says, and a low-rank linear mixing of its frames that no per-feature statistic
  undoes (per-speaker normalization removes the offset and the gain, not the mixing);
- **emotion in a fraction of the frames**: emotional segments of a few frames cover 30-70% of
  an utterance (the share differs per speaker); the other frames carry no emotion at all;
- **speakers express an emotion differently**: each speaker bends every class direction away
  from the shared prototype and has its own expressiveness (amplitude);
- **every utterance coloured on its own**: an offset along a few channel directions and a
  small per-feature gain, drawn per file (what a recording session or a microphone adds);
- **per-corpus channel offsets and gains**, and **feature dimensions scaled over a range of
  ~50x** (plus a few large outlier dimensions, as wav2vec 2.0 has);
- optionally **(L, T, D) multi-layer features**: the emotion peaks in the upper-middle
  layers, the speaker in the lower ones, as probing studies of wav2vec/HuBERT/WavLM report.

Inside an emotional segment the frames move along the speaker's class direction by a shift
(what mean pooling sees) plus a smaller burst of random sign (variance that only a frame-level
model sees); issue 19 made the shift carry most of the emotion, so the set no longer favours
a frame-level model over a linear one on pooled features as much as its first version did.
``difficulty`` divides every emotion amplitude: 1 is the default, 2 halves the emotion.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.contract import layout
from trainer.contract.labels import ALL_EMOTIONS, CREMAD_EMOTIONS

CORPORA = ("ravdess", "cremad")
_CREMAD_CODE = {name: code for code, name in CREMAD_EMOTIONS.items()}
_CREMAD_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
_CREMAD_LEVELS = ("LO", "MD", "HI", "XX")
# Relative class frequencies of the real corpora (RAVDESS: 96 neutral, 192 of each other).
_WEIGHTS = {
    "ravdess": {"neutral": 0.5} | {e: 1.0 for e in ALL_EMOTIONS[1:]},
    "cremad": {"neutral": 0.86} | {e: 1.0 for e in ("happy", "sad", "angry", "fear", "disgust")},
}
_RAVDESS_SHARE = 0.16  # 1,440 RAVDESS files next to 7,442 CREMA-D ones
_FILES_PER_SPEAKER = {"ravdess": 30, "cremad": 60}
_MAX_SPEAKERS = {"ravdess": 24, "cremad": 91}

# The signal's knobs, in units of the per-frame noise's standard deviation (before the
# per-dimension scaling). Emotion amplitudes are divided by the difficulty.
SPEAKER_OFFSET = 0.8  # per feature: speaker identity dominates any pooled vector
SPEAKER_GAIN = 0.3  # log-normal spread of the per-speaker, per-feature gain: the multiplicative part
# ... and a low-rank linear mixing of its frames (x + x V U): what no per-feature statistic undoes.
MIX_RANK, MIX_AMP = 4, 0.7
VOICE_DIRECTIONS, VOICE_AMP = 4, 2.0  # speaker-specific frame-to-frame variation
COLOUR_DIRECTIONS, COLOUR_AMP = 8, 2.5  # per-utterance offset along a few shared channel directions
UTTERANCE_GAIN = 0.1  # log-normal spread of the per-utterance, per-feature gain
CORPUS_OFFSET, CORPUS_GAIN = 1.0, 0.2  # channel: offset per feature, log-normal gain spread
BEND = 0.8  # how far a speaker bends a class direction, relative to the shared prototype
MEAN_SHIFT = 2.5  # the emotion's shift along its direction in emotional frames: what mean pooling sees
BURST_AMP = 1.0  # the burst of random sign per segment: what only frame-level models see
EMOTIONAL_SHARE = (0.3, 0.7)  # share of frames in emotional segments, per speaker
SEGMENT_FRAMES = (3, 8)  # length of one emotional segment (a stressed syllable or so)
EXPRESSIVENESS_SPREAD = 0.35  # log-normal spread of the per-speaker emotion amplitude
INTENSITY_SPREAD = 0.5  # log-normal spread of the per-utterance emotion amplitude (some barely show it)
CALM_NEAR_NEUTRAL, CALM_AMP = 0.8, 0.7  # calm: a quieter neutral, the pair real models confuse
SCALE_RANGE = (0.1, 5.0)  # per-dimension scale, log-uniform: a 50x range
OUTLIER_SHARE, OUTLIER_BIAS = 0.01, 20.0  # a few dimensions with a large constant bias
LAYER_NOISE_SHARED = 0.7  # correlation of the noise between layers


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    files: int
    by_corpus_label: dict[str, dict[str, int]]
    speakers: dict[str, int]
    feature_shape: tuple[int, ...]


@dataclass(frozen=True)
class _World:
    """What every file of one set shares: class prototypes, channels, scaling, layer profiles."""

    prototypes: np.ndarray  # (K, D) unit class directions
    amplitude: np.ndarray  # (K,) class amplitude (calm is quieter)
    corpus_offset: dict[str, np.ndarray]  # (D,)
    corpus_gain: dict[str, np.ndarray]  # (D,)
    colours: np.ndarray  # (COLOUR_DIRECTIONS, D) unit directions of the per-utterance colouring
    scale: np.ndarray  # (L, D) per-dimension scale of each layer
    bias: np.ndarray  # (L, D)
    emotion_in_layer: np.ndarray  # (L,) how much of the emotion each layer carries
    speaker_in_layer: np.ndarray  # (L,)


@dataclass(frozen=True)
class _Speaker:
    offset: np.ndarray  # (D,)
    gain: np.ndarray  # (D,) multiplies the speaker's whole signal
    mix: tuple[np.ndarray, np.ndarray]  # (D, MIX_RANK), (MIX_RANK, D): its low-rank mixing of frames
    voice: np.ndarray  # (VOICE_DIRECTIONS, D) unit directions of its own variation
    directions: np.ndarray  # (K, D) its bent class directions
    expressiveness: float
    emotional_share: float


def synth(
    out_dir: Path,
    n: int = 1000,
    seed: int = 0,
    dim: int = 768,
    min_frames: int = 20,
    max_frames: int = 60,
    dtype: str = "float32",
    difficulty: float = 1.0,
    layers: int = 0,
) -> SynthSummary:
    """Write ``n`` SYNTHETIC feature files to ``out_dir``: (T, D) arrays, or (L, T, D) with
    ``layers`` >= 2, in .npz files with varied keys and plain .npy files."""
    if n < 1 or dim < 2 or not 1 <= min_frames <= max_frames or difficulty <= 0 or layers < 0 or layers == 1:
        raise ValueError("need n >= 1, dim >= 2, 1 <= min_frames <= max_frames, difficulty > 0 "
                         "and layers 0 (T, D arrays) or >= 2")
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layers = max(layers, 1)
    world = _make_world(rng, dim, n_layers, difficulty)
    n_corpus = {"ravdess": round(n * _RAVDESS_SHARE)}
    n_corpus["cremad"] = n - n_corpus["ravdess"]
    names = {c: _speaker_names(c, n_corpus[c]) for c in CORPORA}
    speakers = {s: _make_speaker(rng, world) for c in CORPORA for s in names[c]}

    counts: dict[str, Counter[str]] = {c: Counter() for c in CORPORA}
    used: set[str] = set()
    for i in range(n):
        corpus = "ravdess" if i < n_corpus["ravdess"] else "cremad"
        label = _draw_label(rng, corpus)
        speaker = names[corpus][rng.integers(len(names[corpus]))]
        t = int(rng.integers(min_frames, max_frames + 1))
        frames = _utterance(rng, world, speakers[speaker], corpus, ALL_EMOTIONS.index(label), t)
        if layers == 0:
            frames = frames[0]
        name = _unique(_file_name(rng, corpus, label, speaker), used)
        _write(out_dir / name, frames.astype(dtype), i)
        counts[corpus][label] += 1
    (out_dir / layout.SYNTHETIC_MARKER).write_text(
        "SYNTHETIC DATA. These files were written by `python -m trainer synth` for demos,\n"
        "tests and benchmarks. They mimic the names and shapes of wav2vec features of RAVDESS\n"
        "and CREMA-D but contain generated numbers, not features of real speech.\n"
        f"(n={n}, seed={seed}, dim={dim}, layers={layers}, difficulty={difficulty})\n"
    )
    shape = (dim,) if layers == 0 else (layers, dim)
    return SynthSummary(out_dir, n, {c: dict(sorted(v.items())) for c, v in counts.items()},
                        {c: len(names[c]) for c in CORPORA}, shape)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _speaker_names(corpus: str, files: int) -> list[str]:
    count = min(_MAX_SPEAKERS[corpus], max(2 if corpus == "ravdess" else 3, files // _FILES_PER_SPEAKER[corpus]))
    if corpus == "ravdess":
        return [f"{a:02d}" for a in range(1, 1 + count)]
    return [str(1001 + a) for a in range(count)]


def _make_world(rng: np.random.Generator, dim: int, n_layers: int, difficulty: float) -> _World:
    k = len(ALL_EMOTIONS)
    prototypes = _unit(rng.standard_normal((k, dim)))
    calm = ALL_EMOTIONS.index("calm")
    prototypes[calm] = _unit(prototypes[0] + CALM_NEAR_NEUTRAL * prototypes[calm])
    amplitude = np.ones(k) / difficulty
    amplitude[calm] *= CALM_AMP
    low, high = np.log(SCALE_RANGE)
    scale = np.exp(rng.uniform(low, high, (n_layers, dim)))
    bias = rng.standard_normal((n_layers, dim)) * scale
    outliers = rng.random(dim) < OUTLIER_SHARE
    bias[:, outliers] += OUTLIER_BIAS * rng.choice((-1.0, 1.0), size=int(outliers.sum()))
    depth = np.linspace(0.0, 1.0, n_layers)
    # One layer: it carries everything. Several: emotion peaks at 2/3 depth, speaker early.
    emotion = np.exp(-0.5 * ((depth - 0.65) / 0.15) ** 2) if n_layers > 1 else np.ones(1)
    speaker = 1.0 - 0.6 * depth if n_layers > 1 else np.ones(1)
    return _World(
        prototypes, amplitude,
        {c: CORPUS_OFFSET * rng.standard_normal(dim) for c in CORPORA},
        {c: np.exp(CORPUS_GAIN * rng.standard_normal(dim)) for c in CORPORA},
        _unit(rng.standard_normal((COLOUR_DIRECTIONS, dim))),
        scale, bias, emotion / emotion.max(), speaker,
    )


def _make_speaker(rng: np.random.Generator, world: _World) -> _Speaker:
    k, dim = world.prototypes.shape
    return _Speaker(
        offset=SPEAKER_OFFSET * rng.standard_normal(dim),
        gain=np.exp(SPEAKER_GAIN * rng.standard_normal(dim)),
        mix=(MIX_AMP * _unit(rng.standard_normal((MIX_RANK, dim))).T, _unit(rng.standard_normal((MIX_RANK, dim)))),
        voice=_unit(rng.standard_normal((VOICE_DIRECTIONS, dim))),
        directions=_unit(world.prototypes + BEND * _unit(rng.standard_normal((k, dim)))),
        expressiveness=float(np.exp(EXPRESSIVENESS_SPREAD * rng.standard_normal())),
        emotional_share=float(rng.uniform(*EMOTIONAL_SHARE)),
    )


def _draw_label(rng: np.random.Generator, corpus: str) -> str:
    labels = list(_WEIGHTS[corpus])
    p = np.array([_WEIGHTS[corpus][e] for e in labels])
    return labels[rng.choice(len(labels), p=p / p.sum())]


def _emotion_track(rng: np.random.Generator, speaker: _Speaker, t: int) -> np.ndarray:
    """(t,) the emotion's amplitude per frame: zero outside the emotional segments."""
    track = np.zeros(t)
    mean_length = sum(SEGMENT_FRAMES) / 2
    for _ in range(max(1, round(speaker.emotional_share * t / mean_length))):
        length = int(rng.integers(SEGMENT_FRAMES[0], SEGMENT_FRAMES[1] + 1))
        start = int(rng.integers(0, max(t - length, 0) + 1))
        track[start : start + length] = MEAN_SHIFT + BURST_AMP * rng.choice((-1.0, 1.0))
    return track * speaker.expressiveness


def _utterance(rng: np.random.Generator, world: _World, speaker: _Speaker, corpus: str, k: int,
               t: int) -> np.ndarray:
    """(L, t, D) raw features of one utterance of class ``k``."""
    n_layers, dim = world.scale.shape
    shared = rng.standard_normal((t, dim))
    own = rng.standard_normal((n_layers, t, dim))
    noise = np.sqrt(LAYER_NOISE_SHARED) * shared + np.sqrt(1 - LAYER_NOISE_SHARED) * own
    voice = (VOICE_AMP * rng.standard_normal((t, VOICE_DIRECTIONS))) @ speaker.voice
    intensity = world.amplitude[k] * np.exp(INTENSITY_SPREAD * rng.standard_normal())
    emotion = intensity * _emotion_track(rng, speaker, t)[:, None] * speaker.directions[k]
    colour = (COLOUR_AMP * rng.standard_normal(COLOUR_DIRECTIONS)) @ world.colours
    gain = speaker.gain ** world.speaker_in_layer[:, None, None] * np.exp(UTTERANCE_GAIN * rng.standard_normal(dim))
    signal = noise + world.speaker_in_layer[:, None, None] * voice + world.emotion_in_layer[:, None, None] * emotion
    signal = signal + world.speaker_in_layer[:, None, None] * ((signal @ speaker.mix[0]) @ speaker.mix[1])
    x = (gain * (signal + world.speaker_in_layer[:, None, None] * speaker.offset)
         + colour + world.corpus_offset[corpus])
    return (x * world.corpus_gain[corpus] * world.scale[:, None, :] + world.bias[:, None, :]).astype(np.float32)


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
