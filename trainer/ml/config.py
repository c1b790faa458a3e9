"""The resolved training configuration: what run.json records and a continued run reuses.

Its fields are the options of :mod:`trainer.contract.options` (defaults are written there, once) plus
the run's folders and, for an extended run, its parent. :func:`resolve` turns the options a
command line gave (None = not given) into a config, applying the extension recipe when
``init_from`` names a parent run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.labels import parse_classes
from trainer.contract.options import ARCHITECTURE, BY_NAME, INHERIT, OPTIONS, RECIPE, default
from trainer.ml.errors import UsageError


@dataclass(frozen=True)
class Architecture:
    """What decides the model (hidden and attention: its weights' shapes)."""

    hidden: int = default("hidden")
    attention: int = default("attention")
    dropout: float = default("dropout")


# Options younger than some run.json files, with what the trainer that wrote those did: a run
# trained before per-speaker normalization existed is predicted with global statistics, one
# trained before layer selection with every layer.
_ABSENT_MEANS: dict[str, Any] = {"normalization": "global", "layers": "all"}


@dataclass
class TrainConfig:
    data_dir: str
    run_dir: str
    epochs: int = default("epochs")
    batch_size: int = default("batch_size")
    learning_rate: float = default("learning_rate")
    warmup_epochs: int = default("warmup_epochs")
    split: str = default("split")
    val_fraction: float = default("val_fraction")
    seed: int = default("seed")
    clip_norm: float = default("clip_norm")
    weight_decay: float = default("weight_decay")
    mixed_precision: bool | None = default("mixed_precision")  # None: chosen per device
    label_smoothing: float = default("label_smoothing")
    class_weights: bool = default("class_weights")
    frame_dropout: float = default("frame_dropout")
    feature_noise: float = default("feature_noise")
    mixup: float = default("mixup")
    head_dropout: float = default("head_dropout")
    ema_epochs: float = default("ema_epochs")
    patience: int = default("patience")
    normalization: str = default("normalization")
    speaker_min_files: int = default("speaker_min_files")
    layers: str = default("layers")
    layer_weighting: bool = default("layer_weighting")
    classes: tuple[str, ...] = parse_classes(default("classes"))
    stats_dir: str | None = default("stats_dir")
    cache_dir: str | None = default("cache_dir")
    cache: bool = default("cache")
    init_from: str | None = default("init_from")
    architecture: Architecture = field(default_factory=Architecture)
    # Filled in when extending a parent run.
    parent_run: str | None = None
    parent_best_val_accuracy: float | None = None
    # TensorBoard's step of this run's epoch 0: the parent's at its best epoch (its weights are
    # where this run starts), so an extended run's curves go on from there; 0 for a new run.
    parent_step: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """From run.json's ``config``; keys of other versions are ignored, missing ones default
        (or take the value the trainer that wrote them had: _ABSENT_MEANS)."""
        known = {f.name for f in fields(cls)}
        d = _ABSENT_MEANS | {k: v for k, v in d.items() if k in known}
        arch = d.get("architecture", {})
        d["architecture"] = Architecture(**{k: v for k, v in arch.items() if k in ARCHITECTURE})
        d["classes"] = tuple(d.get("classes", cls.classes))
        return cls(**d)

    def option(self, name: str) -> Any:
        """The value of one option of trainer.contract.options, architecture ones included."""
        if name in ARCHITECTURE:
            return getattr(self.architecture, name)
        value = getattr(self, name)
        return ",".join(value) if name == "classes" else value


def resolve(options: dict[str, Any]) -> TrainConfig:
    """Build the config from command-line options (None = not given). With ``init_from``
    naming a run, what the options table says an extended run does with each option."""
    given = {k: v for k, v in options.items() if v is not None}
    init_from = given.get("init_from")
    parent = _parent_run(Path(init_from)) if init_from else None
    extra: dict[str, Any] = {}
    if parent is not None:
        parent_cfg, parent_status = parent
        # The parent's statistics and split: the extended model sees the very same inputs.
        given.setdefault("stats_dir", str(Path(init_from) / layout.STATS_DIR))
        for option in OPTIONS:
            if option.name in given:
                if option.shape and given[option.name] != parent_cfg.option(option.name):
                    raise UsageError(
                        f"{option.flag} {given[option.name]} conflicts with the parent run's architecture "
                        f"({option.name}={parent_cfg.option(option.name)}); an extended run keeps the parent's "
                        "architecture: drop the option")
                if option.name == "classes" and parse_classes(given["classes"]) != parent_cfg.classes:
                    raise UsageError("--classes differs from the parent run's classes; an extended run keeps them")
            elif option.on_extend == INHERIT:
                given[option.name] = parent_cfg.option(option.name)
            elif option.on_extend == RECIPE:
                given[option.name] = (parent_cfg.option(option.name) * option.extend_scale
                                      if option.extend_scale is not None else option.extend)
        best_epoch = parent_status.get("best_epoch")
        extra = {"parent_run": Path(init_from).name,
                 "parent_best_val_accuracy": parent_status.get("best_val_accuracy"),
                 "parent_step": parent_cfg.parent_step + (best_epoch if isinstance(best_epoch, int) else 0)}
    arch = {k: given.pop(k) for k in ARCHITECTURE if k in given}
    if "classes" in given:
        given["classes"] = parse_classes(given["classes"])
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    assert not unknown, f"not options of the trainer: {unknown}"
    return TrainConfig(**given, architecture=Architecture(**arch), **extra)


def _parent_run(path: Path) -> tuple[TrainConfig, dict[str, Any]] | None:
    """(config, status) of the run at ``path``; None when ``path`` is a weights file."""
    if path.is_file():
        return None
    run_json = path / layout.RUN_JSON
    if not run_json.is_file():
        raise UsageError(f"{BY_NAME['init_from'].flag} {path}: neither a run directory (no {layout.RUN_JSON}) "
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
