"""Evaluation report (confusion matrix, per-class P/R/F1, macro F1, accuracy, unweighted
accuracy), plots, and running a model over sequences. numpy only at import time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.ml.layerselect import frames_of, take
from trainer.ml.speakers import Normalization, Plan, describe
from trainer.ml.stats import Stats


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Everything the evaluation report holds, JSON-ready."""
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    present = support > 0
    return {
        "classes": list(classes),
        "samples": int(cm.sum()),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        # Mean recall over the classes present: the "UA" of emotion recognition papers.
        "unweighted_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),  # rows: true class, columns: predicted class
    }


def predict_probabilities(model: Any, sequences: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) for sequences of frames, batched by similar length (the model
    normalizes them: trainer/ml/model.py)."""
    from trainer.ml.pipeline import length_sorted_batches, pad_batch, topped_up

    lengths = np.array([len(s) for s in sequences])
    # Under MirroredStrategy (TensorFlow) a batch is topped up for its replicas; those rows are dropped.
    strategy = getattr(model, "distribute_strategy", None)
    replicas = getattr(strategy, "num_replicas_in_sync", 1)
    probs: np.ndarray | None = None
    for idx in length_sorted_batches(np.arange(len(sequences)), lengths, batch_size, None):
        batch = [sequences[i] for i in topped_up(idx, replicas)]
        logits = np.asarray(model.predict_on_batch(pad_batch(batch)))[:len(idx)]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        if probs is None:
            probs = np.zeros((len(sequences), p.shape[1]), dtype=np.float32)
        probs[idx] = p
    return probs if probs is not None else np.zeros((0, 0), dtype=np.float32)


def scoring_scope(run_dir: Path, ds: Any, all_files: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Which samples of ``ds`` evaluate scores, and a description of that choice.

    By default every file that is not in the run's training split: its validation split and
    files the run never saw. Scoring training files would measure memory, not the model."""
    import json

    from trainer.contract import layout

    try:
        split = json.loads((run_dir / layout.stats_path(layout.SPLIT_JSON)).read_text())
        trained = set(split["train"])
        validation = set(split["validation"])
    except (OSError, ValueError, KeyError, TypeError):
        trained, validation = set(), set()
    rels = [s.rel for s in ds.samples]
    in_train = np.array([r in trained for r in rels], dtype=bool)
    in_val = np.array([r in validation for r in rels], dtype=bool)
    unseen = ~in_train & ~in_val
    chosen = np.arange(len(rels)) if all_files else np.flatnonzero(~in_train)
    kinds = [name for name, present in (("validation", in_val.any()), ("unseen", unseen.any())) if present]
    scope = {
        "scope": "all" if all_files else "+".join(kinds) or "none",
        "validation_files": int(in_val.sum()),
        "unseen_files": int(unseen.sum()),
        "training_files": int(in_train.sum()),
        "training_files_scored": bool(all_files and in_train.any()),
    }
    return chosen, scope


def describe_scope(scope: dict[str, Any]) -> str:
    """One sentence saying what was scored."""
    parts = []
    if scope["validation_files"]:
        parts.append(f"{scope['validation_files']} of the run's validation split")
    if scope["unseen_files"]:
        parts.append(f"{scope['unseen_files']} files the run never saw")
    if scope["training_files_scored"]:
        parts.append(f"{scope['training_files']} of its TRAINING split (--all: these flatter the model)")
    text = "scored " + (", ".join(parts) or "nothing")
    if scope["training_files"] and not scope["training_files_scored"]:
        text += f"; {scope['training_files']} training-split files left out (--all scores them too)"
    return text


def render_report(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    if "scope" in report:
        console.print(describe_scope(report["scope"]), markup=False, soft_wrap=True)
    if "normalization" in report:
        console.print(describe(report["normalization"]), markup=False, soft_wrap=True)
    console.print(
        f"{report['samples']} samples: accuracy {report['accuracy']:.4f}, unweighted accuracy "
        f"{report['unweighted_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}"
    )
    table = Table(title="Per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c, m in report["per_class"].items():
        table.add_row(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    console.print(table)
    cm = Table(title="Confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for c in report["classes"]:
        cm.add_column(c[:7], justify="right")
    for c, row in zip(report["classes"], report["confusion_matrix"], strict=True):
        cm.add_row(c, *map(str, row))
    console.print(cm)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: the training box has no display
    import matplotlib.pyplot as plt

    return plt


def plot_title(run_id: str | None, note: str = "") -> str:
    """The heading every plot of a run carries: the run id, and e.g. 'SYNTHETIC data'."""
    return " · ".join(part for part in (f"run {run_id}" if run_id else "", note) if part)


def plot_curves(history: list[dict[str, Any]], path: Path, run_id: str | None = None,
                best_epoch: int | None = None, note: str = "") -> None:
    """Loss and accuracy per epoch (train and validation) as a PNG; the best epoch (the
    checkpoint the run keeps) is marked on both, epoch 0 meaning an extended run's parent."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, [h[key] for h in history], label=f"train {key}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label=f"validation {key}")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:green", linestyle="--", linewidth=1,
                       label=f"best epoch {best_epoch}" + (" (parent)" if best_epoch == 0 else ""))
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    best = next((h for h in history if h["epoch"] == best_epoch), None)
    if best is not None:
        ax_acc.plot([best_epoch], [best["val_accuracy"]], marker="*", markersize=14, color="tab:green",
                    linestyle="none", label=f"best val accuracy {best['val_accuracy']:.3f}")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.suptitle(plot_title(run_id, note))
    fig.tight_layout()
    _save_png(fig, path)


def plot_confusion(report: dict[str, Any], path: Path, run_id: str | None = None, note: str = "") -> None:
    plt = _pyplot()
    cm = np.array(report["confusion_matrix"])
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 1.2 + 0.8 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation: accuracy {report['accuracy']:.3f}, UA {report['unweighted_accuracy']:.3f}")
    fig.suptitle(plot_title(run_id, note))
    fig.tight_layout()
    _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> None:
    from trainer.machine.fsutil import atomic_write

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    _pyplot().close(fig)


@dataclass(frozen=True)
class RunModel:
    """What prediction needs of a finished run."""

    model: Any  # with the best weights
    stats: Stats  # the model's global input statistics
    classes: tuple[str, ...]
    feature_shape: tuple[int, ...]
    normalization: Normalization  # what is done to frames before ``stats`` (per speaker, or nothing)
    layers: str  # the run's --layers, resolved: the layers of (L, T, D) inputs the model sees

    def prepare_dataset(self, ds: Any) -> Plan:
        """``ds`` (loaded from files) made what the model saw in training: its layers, normalized."""
        take(ds, self.layers)
        return self.normalization.apply_dataset(ds)

    def prepare(self, sequences: Sequence[np.ndarray], keys: Sequence[str | None]) -> tuple[list[np.ndarray], Plan]:
        """Sequences of files (their speakers ``keys``) made what the model saw in training."""
        return self.normalization.apply([frames_of(s, self.layers) for s in sequences], keys)


def load_run_model(run_dir: Path) -> RunModel:
    """The model with the best weights, its statistics and normalization, of a finished run."""
    import json

    from trainer.contract import layout
    from trainer.ml.config import TrainConfig
    from trainer.ml.errors import UsageError
    from trainer.ml.model import build_model
    from trainer.ml.speakers import run_normalization
    from trainer.ml.stats import load_stats

    try:
        doc = json.loads((run_dir / layout.RUN_JSON).read_text())
        cfg = TrainConfig.from_json(doc["config"])
        feature_shape = tuple(doc["feature_shape"])
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{run_dir}: not a run directory ({layout.RUN_JSON} unreadable: {exc})") from exc
    best = run_dir / layout.BEST_WEIGHTS
    if not best.is_file():
        raise UsageError(f"{run_dir}: no {layout.BEST_WEIGHTS} yet (has an epoch finished?)")
    stats = load_stats(run_dir / layout.STATS_DIR, feature_shape)
    model = build_model(cfg.architecture, stats, len(cfg.classes))
    model.load_weights(best)
    return RunModel(model, stats, cfg.classes, feature_shape, run_normalization(cfg, run_dir, feature_shape),
                    cfg.layers)
