"""The committed state of a run (``checkpoints/state.json``): the ONE commit point of an epoch.

Everything else in the run directory (metrics.jsonl, status.json, best.weights.h5, the
manifest) is derived from it; see trainer/contract/layout.py. Pure Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.machine import faults
from trainer.machine.fsutil import atomic_write_json
from trainer.ml.errors import TrainerError, UsageError

VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """One committed weights file: its path relative to the run directory and its sha256."""

    file: str
    sha256: str

    def __post_init__(self) -> None:
        # The state names only our own epoch files: never a path outside checkpoints/.
        name = self.file.removeprefix(f"{layout.CHECKPOINTS_DIR}/")
        if layout.epoch_weights(layout.epoch_of(name) or 0) != self.file or len(self.sha256) != 64:
            raise ValueError(f"not a checkpoint of this run: {self.file!r}")


@dataclass(frozen=True)
class RunState:
    epoch: int = 0  # committed epochs
    last: Checkpoint | None = None  # what training continues from (weights + optimizer)
    best: Checkpoint | None = None  # what best.weights.h5 is
    best_val_accuracy: float | None = None
    best_epoch: int | None = None  # 0: the parent's weights (an extended run's epoch 0)
    parent: str | None = None  # the parent run of an extended run
    parent_best_val_accuracy: float | None = None
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # one metrics row per epoch

    def files(self) -> set[str]:
        """The weights files this state names: every other epoch file may go."""
        return {c.file for c in (self.last, self.best) if c is not None}

    def improves(self, val_accuracy: float) -> bool:
        return self.best_val_accuracy is None or val_accuracy > self.best_val_accuracy

    def after_epoch(self, row: dict[str, Any], saved: Checkpoint) -> RunState:
        """The state once epoch ``row["epoch"]`` (whose weights are ``saved``) is committed."""
        assert row["epoch"] == self.epoch + 1, (row["epoch"], self.epoch)
        better = self.improves(row["val_accuracy"])
        return replace(self, epoch=row["epoch"], last=saved, history=(*self.history, row),
                       best=saved if better else self.best,
                       best_val_accuracy=row["val_accuracy"] if better else self.best_val_accuracy,
                       best_epoch=row["epoch"] if better else self.best_epoch)

    def with_parent_weights(self, saved: Checkpoint) -> RunState:
        """An extended run's epoch 0: the parent's best weights are its best until beaten."""
        return replace(self, best=saved, best_epoch=0)

    def status_fields(self) -> dict[str, Any]:
        """What status.json says about progress and best, and how it compares with the parent."""
        best, parent = self.best_val_accuracy, self.parent_best_val_accuracy
        has_parent = self.parent is not None
        return {
            "epoch": self.epoch,
            "val_accuracy": self.history[-1]["val_accuracy"] if self.history else None,
            "best_val_accuracy": best,
            "best_epoch": self.best_epoch,
            "parent_best_val_accuracy": parent,
            "vs_parent": round(best - parent, 4) if has_parent and best is not None and parent is not None else None,
            # best starts as the parent's (best_epoch 0): only a checkpoint of this run beats it
            "beat_parent": bool(self.best_epoch) if has_parent else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "epoch": self.epoch, "last": _ref_json(self.last), "best": _ref_json(self.best),
                "best_val_accuracy": self.best_val_accuracy, "best_epoch": self.best_epoch,
                "parent": self.parent, "parent_best_val_accuracy": self.parent_best_val_accuracy,
                "history": list(self.history)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunState:
        state = cls(epoch=int(d["epoch"]), last=_ref(d["last"]), best=_ref(d["best"]),
                    best_val_accuracy=_number(d["best_val_accuracy"]), best_epoch=d["best_epoch"],
                    parent=d.get("parent"), parent_best_val_accuracy=_number(d.get("parent_best_val_accuracy")),
                    history=tuple(d["history"]))
        if [row["epoch"] for row in state.history] != list(range(1, state.epoch + 1)):
            raise ValueError("history does not hold epochs 1..epoch once each")
        if (state.epoch > 0) != (state.last is not None):
            raise ValueError("'last' must name a file exactly when an epoch is committed")
        return state


def initial(parent: str | None, parent_best_val_accuracy: float | None) -> RunState:
    """Before the first commit: an extended run's best is its parent's (best_epoch 0)."""
    return RunState(best_val_accuracy=parent_best_val_accuracy, best_epoch=0 if parent else None,
                    parent=parent, parent_best_val_accuracy=parent_best_val_accuracy)


def read(run_dir: Path) -> RunState | None:
    """The committed state of ``run_dir``; None before the first commit. A run directory of the
    layout before the commit point, or a damaged state, is one clear error."""
    path = run_dir / layout.STATE
    if not path.exists():
        if (run_dir / layout.LEGACY_STATE).exists() or (run_dir / layout.BEST_WEIGHTS).exists():
            raise UsageError(f"{run_dir} was written by an older trainer (no {layout.STATE}) and cannot be "
                             f"continued; start a new run from its best checkpoint with --init-from {run_dir}")
        return None
    try:
        state = RunState.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainerError(f"{path}: unreadable committed state ({exc}); the run cannot be continued") from exc
    missing = sorted(f for f in state.files() if not (run_dir / f).is_file())
    if missing:
        raise TrainerError(f"{run_dir}: committed checkpoint {missing[0]} is missing; the run cannot be continued")
    return state


def commit(run_dir: Path, state: RunState) -> None:
    """THE commit point: atomically replace state.json (temp, fsync, rename, fsync folder)."""
    atomic_write_json(run_dir / layout.STATE, state.to_json(), failpoint="state:temp")
    faults.point("commit:done")


def _ref_json(c: Checkpoint | None) -> dict[str, str] | None:
    return None if c is None else {"file": c.file, "sha256": c.sha256}


def _ref(d: dict[str, Any] | None) -> Checkpoint | None:
    return None if d is None else Checkpoint(str(d["file"]), str(d["sha256"]))


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
