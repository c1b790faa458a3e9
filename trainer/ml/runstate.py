"""The committed state of a run (``checkpoints/state.json``): the ONE commit point of an epoch
(and of a position inside one, when a stop comes long before the epoch's end).

Everything else in the run directory (metrics.jsonl, status.json, best.weights.h5, the
manifest) is derived from it; see trainer/contract/layout.py. Pure Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.wire import MAX_RECOVERIES, Recovery, WireError
from trainer.machine import faults
from trainer.machine.fsutil import atomic_write_json
from trainer.ml.errors import TrainerError, UsageError

VERSION = 2  # 2: ``rng`` and ``partial`` (a state of version 1 continues, though not exactly)
# ``recoveries`` came later without a new version: a state without it reads as none, and a trainer
# that does not know it ignores it (it is a record of the run, not training state).

# Values of Keras variables as JSON (one nested list per variable, in trainer.ml.trainstate's order).
Values = list[Any]


@dataclass(frozen=True)
class Checkpoint:
    """One committed weights file: its path relative to the run directory and its sha256."""

    file: str
    sha256: str

    def __post_init__(self) -> None:
        # The state names only our own checkpoint files: never a path outside checkpoints/.
        found = layout.checkpoint_of(self.file.removeprefix(f"{layout.CHECKPOINTS_DIR}/"))
        if found is None or layout.epoch_weights(*found) != self.file or len(self.sha256) != 64:
            raise ValueError(f"not a checkpoint of this run: {self.file!r}")


@dataclass(frozen=True)
class Position:
    """A committed position inside epoch ``epoch`` (the committed epoch + 1): its first ``batch``
    batches are trained. With the weights, what the weights file leaves out: the random
    generators' states, the metric accumulators and the epoch's training seconds so far."""

    epoch: int
    batch: int
    weights: Checkpoint
    rng: Values
    metrics: Values
    seconds: float

    def __post_init__(self) -> None:
        if self.batch < 1 or self.weights.file != layout.epoch_weights(self.epoch, self.batch):
            raise ValueError(f"position {self.epoch}/{self.batch} does not name its own file {self.weights.file!r}")

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, **_ref_json(self.weights), "rng": self.rng,
                "metrics": self.metrics, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Position:
        return cls(int(d["epoch"]), int(d["batch"]), _ref(d), list(d["rng"]), list(d["metrics"]), float(d["seconds"]))


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
    rng: Values | None = None  # the random generators' states at the end of ``last`` (None: not recorded)
    partial: Position | None = None  # a position inside the next epoch, committed by a stop
    # what orch's recovery loop did to the run (trainer.contract.wire.Recovery records), oldest first
    recoveries: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def files(self) -> set[str]:
        """The weights files this state names: every other checkpoint file may go."""
        partial = self.partial.weights if self.partial is not None else None
        return {c.file for c in (self.last, self.best, partial) if c is not None}

    def improves(self, val_accuracy: float) -> bool:
        return self.best_val_accuracy is None or val_accuracy > self.best_val_accuracy

    def after_epoch(self, row: dict[str, Any], saved: Checkpoint, rng: Values | None = None) -> RunState:
        """The state once epoch ``row["epoch"]`` (whose weights are ``saved``, and the random
        generators' states ``rng``) is committed; a position inside it is superseded."""
        assert row["epoch"] == self.epoch + 1, (row["epoch"], self.epoch)
        better = self.improves(row["val_accuracy"])
        return replace(self, epoch=row["epoch"], last=saved, history=(*self.history, row), rng=rng, partial=None,
                       best=saved if better else self.best,
                       best_val_accuracy=row["val_accuracy"] if better else self.best_val_accuracy,
                       best_epoch=row["epoch"] if better else self.best_epoch)

    def at_position(self, position: Position) -> RunState:
        """The state once a position inside the next epoch is committed (nothing else changes)."""
        assert position.epoch == self.epoch + 1, (position.epoch, self.epoch)
        return replace(self, partial=position)

    def with_recovery(self, recovery: Recovery) -> RunState:
        """The state with one more recovery recorded; the same record (its ``at``) again (a
        relaunch after a failed start) changes nothing. The last MAX_RECOVERIES are kept."""
        if any(r.get("at") == recovery.at for r in self.recoveries):
            return self
        return replace(self, recoveries=(*self.recoveries, recovery.to_json())[-MAX_RECOVERIES:])

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
            "recoveries": list(self.recoveries),
        }

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "epoch": self.epoch, "last": _ref_json(self.last), "best": _ref_json(self.best),
                "best_val_accuracy": self.best_val_accuracy, "best_epoch": self.best_epoch,
                "parent": self.parent, "parent_best_val_accuracy": self.parent_best_val_accuracy,
                "history": list(self.history), "rng": self.rng,
                "partial": None if self.partial is None else self.partial.to_json(),
                "recoveries": list(self.recoveries)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunState:
        state = cls(epoch=int(d["epoch"]), last=_ref(d["last"]), best=_ref(d["best"]),
                    best_val_accuracy=_number(d["best_val_accuracy"]), best_epoch=d["best_epoch"],
                    parent=d.get("parent"), parent_best_val_accuracy=_number(d.get("parent_best_val_accuracy")),
                    history=tuple(d["history"]), rng=d.get("rng"),
                    partial=None if d.get("partial") is None else Position.from_json(d["partial"]),
                    recoveries=_recoveries(d.get("recoveries")))
        if state.partial is not None and state.partial.epoch != state.epoch + 1:
            raise ValueError(f"a position inside epoch {state.partial.epoch} after {state.epoch} committed epochs")
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


def _recoveries(value: Any) -> tuple[dict[str, Any], ...]:
    """The recorded recoveries, each checked as the wire record it is (a state restored from
    storage is the run's own, but its record is only shown: one that is not a record is left out)."""
    if not isinstance(value, list):
        return ()
    found = []
    for item in value[-MAX_RECOVERIES:]:
        try:
            found.append(Recovery.from_json(item).to_json())
        except WireError:
            continue
    return tuple(found)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
