"""The resolved training configuration: what run.json records and a continued run reuses.

Options left unset on the command line are None here and resolved in one place
(:func:`resolve`), so an extended run can tell "not given" from "given the default".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer import layout
from trainer.errors import UsageError
from trainer.labels import DEFAULT_CLASSES


@dataclass(frozen=True)
class Architecture:
    """Everything that decides the model's weights' shapes; a child run must match it."""

    hidden: int = 256  # per-frame projection width
    attention: int = 128  # attention MLP width in the pooling layer
    dropout: float = 0.3


@dataclass
class TrainConfig:
    data_dir: str
    run_dir: str
    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_epochs: int = 5
    split: str = "random"
    val_fraction: float = 0.1
    seed: int = 42
    classes: tuple[str, ...] = DEFAULT_CLASSES
    stats_dir: str | None = None
    init_from: str | None = None
    mixed_precision: bool = False
    patience: int | None = None  # early stopping; off by default
    label_smoothing: float = 0.0
    clip_norm: float = 1.0
    weight_decay: float = 1e-4
    class_weights: bool = True
    cache_dir: str | None = None
    no_cache: bool = False
    architecture: Architecture = field(default_factory=Architecture)
    # Filled in when extending a parent run.
    parent_run: str | None = None
    parent_best_val_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["architecture"] = Architecture(**d.get("architecture", {}))
        d["classes"] = tuple(d.get("classes", DEFAULT_CLASSES))
        return cls(**d)


# The extended-training recipe (the old "extended" scripts, now defaults of --init-from).
EXTEND_EPOCHS = 100
EXTEND_WARMUP = 1
EXTEND_LR_FACTOR = 0.5


def resolve(options: dict[str, Any]) -> TrainConfig:
    """Build the config from CLI options (None = not given), applying the extended-training
    defaults and the parent's architecture, classes and stats when ``init_from`` names a run."""
    arch_given = {k: options.pop(k) for k in ("hidden", "attention", "dropout") if k in options}
    arch_given = {k: v for k, v in arch_given.items() if v is not None}
    given = {k: v for k, v in options.items() if v is not None}
    init_from = given.get("init_from")
    parent = _parent_run(Path(init_from)) if init_from else None
    if parent is None:
        return TrainConfig(**given, architecture=Architecture(**arch_given))

    parent_cfg, parent_status = parent
    parent_arch = asdict(parent_cfg.architecture)
    for key, value in arch_given.items():
        # Dropout does not change any weight's shape: it may differ.
        if key != "dropout" and value != parent_arch[key]:
            raise UsageError(
                f"--{key} {value} conflicts with the parent run's architecture ({key}={parent_arch[key]}); "
                "an extended run keeps the parent's architecture: drop the option"
            )
    if "classes" in given and tuple(given["classes"]) != tuple(parent_cfg.classes):
        raise UsageError("--classes differs from the parent run's classes; an extended run keeps them")
    parent_dir = Path(init_from)
    given.setdefault("epochs", EXTEND_EPOCHS)
    given.setdefault("warmup_epochs", EXTEND_WARMUP)
    given.setdefault("learning_rate", parent_cfg.learning_rate * EXTEND_LR_FACTOR)
    for key in ("batch_size", "split", "val_fraction", "seed", "label_smoothing", "clip_norm",
                "weight_decay", "class_weights"):
        given.setdefault(key, getattr(parent_cfg, key))
    given.setdefault("stats_dir", str(parent_dir / layout.STATS_DIR))
    given["classes"] = parent_cfg.classes
    return TrainConfig(
        **given,
        architecture=Architecture(**(parent_arch | arch_given)),
        parent_run=parent_dir.name,
        parent_best_val_accuracy=parent_status.get("best_val_accuracy"),
    )


def _parent_run(path: Path) -> tuple[TrainConfig, dict[str, Any]] | None:
    """(config, status) of the run at ``path``; None when ``path`` is a weights file."""
    if path.is_file():
        return None
    run_json = path / layout.RUN_JSON
    if not run_json.is_file():
        raise UsageError(f"--init-from {path}: neither a run directory (no {layout.RUN_JSON}) "
                         "nor a .weights.h5 file")
    if not (path / layout.BEST_WEIGHTS).is_file():
        raise UsageError(f"--init-from {path}: the run has no {layout.BEST_WEIGHTS} yet")
    try:
        cfg = TrainConfig.from_json(json.loads(run_json.read_text())["config"])
        status_path = path / layout.STATUS
        status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--init-from {path}: unreadable {layout.RUN_JSON} ({exc})") from exc
    return cfg, status
