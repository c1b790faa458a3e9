"""Layer selection for (L, T, D) features (``--layers``): the model sees only some layers.

Probing studies of wav2vec 2.0, HuBERT and WavLM find emotion in the upper-middle layers and
the speaker in the lower ones; a learned weighting of all layers must find that out from the
labels, and mixes speaker information in while it does. ``auto`` asks a probe instead: per
layer, a nearest-class-mean classifier on that layer's mean+std pooled features (z-scored on
the training split), fitted on the training split and scored (unweighted accuracy) on the
validation split's other speakers; the run keeps the ``KEEP`` consecutive layers around the
best one. The selection is taken once, on loading (the dataset keeps only those layers, which
also divides its memory), recorded in run.json's config, and applied by evaluate and predict.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trainer.ml.dataset import Dataset
from trainer.ml.errors import DataError
from trainer.ml.split import Split
from trainer.ml.stats import compute_stats

ALL, AUTO = "all", "auto"
KEEP = 3
Log = Callable[[str], None]


def chosen(spec: str) -> list[int] | None:
    """The layer numbers of a resolved ``--layers`` value; None for all of them."""
    return None if spec == ALL else [int(x) for x in spec.split(",")]


def take(ds: Dataset, spec: str) -> None:
    """Keep only the layers ``spec`` names in ``ds`` (in memory, once); all: nothing to do."""
    if len(ds.feature_shape) != 2:  # (T, D) features have no layers to choose from
        return
    layers = chosen(spec)
    if layers is None:
        return
    if max(layers) >= ds.feature_shape[0]:
        raise DataError(f"--layers {spec}: the features have {ds.feature_shape[0]} layers (0 to "
                        f"{ds.feature_shape[0] - 1})")
    ds.frames = np.ascontiguousarray(ds.frames[:, layers])
    ds.feature_shape = (len(layers), ds.feature_shape[1])


def frames_of(sequence: np.ndarray, spec: str) -> np.ndarray:
    """One (T, L, D) sequence with only the layers ``spec`` names (as :func:`take` does)."""
    if sequence.ndim != 3:
        return sequence
    layers = chosen(spec)
    return sequence if layers is None else sequence[:, layers]


def resolve(spec: str, ds: Dataset, split: Split, log: Log) -> str:
    """``auto`` resolved by the probe into layer numbers (other values as they are)."""
    if spec != AUTO:
        return spec
    if len(ds.feature_shape) != 2 or ds.feature_shape[0] <= KEEP:
        return ALL
    scores = probe(ds, split)
    best = int(np.argmax(scores))
    start = int(np.clip(best - KEEP // 2, 0, ds.feature_shape[0] - KEEP))
    layers = ",".join(str(layer) for layer in range(start, start + KEEP))
    log(f"layers {layers} of {ds.feature_shape[0]} (--layers auto: the probe's unweighted accuracy per layer on the "
        f"validation split {', '.join(f'{s:.2f}' for s in scores)})")
    return layers


def probe(ds: Dataset, split: Split) -> list[float]:
    """Per layer: unweighted accuracy on the validation split of a nearest-class-mean
    classifier on that layer's mean+std pooled, z-scored features fitted on the training split."""
    stats = compute_stats(ds, split.train)
    pooled = np.stack([np.concatenate([z.mean(axis=0), z.std(axis=0)], axis=-1)
                       for z in (stats.normalize(ds.sequence(i)) for i in range(len(ds)))])  # (N, L, 2D)
    labels = ds.label_ids()
    train, val = pooled[split.train], pooled[split.val]
    centre, scale = train.mean(axis=0), np.maximum(train.std(axis=0), 1e-6)
    train, val = (train - centre) / scale, (val - centre) / scale
    classes = np.unique(labels[split.train])
    truth = labels[split.val]
    present = [k for k in classes if (truth == k).any()]
    scores = []
    for layer in range(ds.feature_shape[0]):  # one layer at a time: (N_val, K, 2D) stays small
        means = np.stack([train[labels[split.train] == k, layer].mean(axis=0) for k in classes])
        predicted = classes[((val[:, None, layer] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)]
        scores.append(float(np.mean([(predicted[truth == k] == k).mean() for k in present])))
    return scores
