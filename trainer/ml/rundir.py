"""Writing the run directory (the contract and its commit point: trainer/contract/layout.py).

:class:`RunDir` keeps the last committed state (trainer/ml/runstate.py) and derives everything
else from it, in an order that keeps MANIFEST.sha256 true at every instant: whatever is about
to change is first taken out of the manifest, and put back only once it is in place. The same
:meth:`RunDir.publish` runs after every commit and, as the repair, when a run starts again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.files import is_disk_full, sha256_file
from trainer.machine import faults
from trainer.machine.fsutil import (
    atomic_write_bytes,
    json_bytes,
    link_or_copy,
    overwrite_in_place,
    replacing,
)
from trainer.machine.proc import pid_line
from trainer.ml import runstate
from trainer.ml.heartbeat import Heartbeat
from trainer.ml.runstate import Checkpoint, RunState
from trainer.ml.tbevents import EventFiles


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """One run directory, written by the one training process that holds its lock."""

    def __init__(self, path: Path, state: RunState | None = None) -> None:
        self.path = path
        self.state = state or RunState()  # the last committed state
        self._best_source: str | None = None  # the state file best.weights.h5 was derived from here
        self._listed_cache: set[str] | None = None  # what MANIFEST.sha256 lists now
        self.heartbeat = Heartbeat(path)  # the sign of life while it works
        self.events = EventFiles(path)  # TensorBoard's event files
        self.step_offset = 0  # TensorBoard's step of epoch 0: an extended run's parent's (TrainConfig.parent_step)

    def file(self, rel: str) -> Path:
        return self.path / rel

    def create(self) -> None:
        for sub in (layout.CHECKPOINTS_DIR, layout.STATS_DIR):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def write_pid(self) -> None:
        atomic_write_bytes(self.file(layout.PID_FILE), pid_line(os.getpid()).encode())

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.file(rel).read_text())
        except (OSError, ValueError):
            return None

    # ---- the commit point -------------------------------------------------------------------

    def write_checkpoint(self, epoch: int, write: Callable[[Path], None], batch: int | None = None) -> Checkpoint:
        """Step 1 of a commit: ``write(temp path)`` (e.g. model.save_weights), fsync, hash once,
        rename to ``checkpoints/epoch-NNNN.weights.h5`` (``-batch-BBBB`` for a position inside
        epoch NNNN), fsync the folder. Not committed yet."""
        rel = layout.epoch_weights(epoch, batch)
        final = self.file(rel)
        faults.point("commit:begin")
        # Keras insists on the suffix of the temp file
        with replacing(final, suffix=".weights.h5", renamed_failpoint="weights:renamed") as tmp:
            write(tmp)
            faults.point("weights:temp")
            digest = sha256_file(tmp, fsync=True)
            faults.point("weights:synced")
        return Checkpoint(rel, digest)

    def commit(self, state: RunState) -> None:
        """Step 2, THE commit point: the state file is replaced; the rest derives from it."""
        runstate.commit(self.path, state)
        self.state = state

    # ---- what derives from the state ------------------------------------------------------

    def publish(self, state_name: str | None, final: bool = False, **fields: Any) -> None:
        """Bring every derived file in line with the committed state: metrics.jsonl, the TensorBoard
        event files, status.json (``state_name``, unless None), best.weights.h5, the manifest
        (``final``: the run has ended, so status, metrics, the evaluation and the event files are
        listed too); then delete the epoch files
        the state no longer names. Safe to repeat, and to kill at any point."""
        best = self.state.best
        in_place = self._best_in_place(best)
        # Nothing the manifest lists may change below: take those files out of it first.
        self._write_manifest(best if in_place else None, final=False)
        faults.point("publish:unlisted")
        self._write_metrics()
        faults.point("publish:metrics")
        self.events.publish(self.state.history, self.step_offset)
        if state_name is not None:
            self.write_status(state_name, **self.state.status_fields(), **fields)
            faults.point("publish:status")
        if not in_place:
            self._derive_best(best)
            faults.point("publish:best")
        self._write_manifest(best, final)
        faults.point("publish:listed")
        self._delete_unnamed()

    def repair(self, state_name: str | None, final: bool = False, **fields: Any) -> None:
        """What a start does before anything else: remove what a kill left half-done (temp
        files, uncommitted epoch files, a stale manifest or best), then publish."""
        faults.point("repair:begin")
        self.remove_temps()
        self.publish(state_name, final, **fields)

    def finish(self, state_name: str, **fields: Any) -> None:
        """The run ends in ``state_name`` (finished, failed, stopped, interrupted): the manifest lists all."""
        self.publish(state_name, final=True, phase=None, **fields)

    def fail_on_full_disk(self, message: str) -> None:
        """Mark the run failed on a full disk: free what is ours to free (temp and uncommitted
        files), keep the committed state, then write status the normal way, or in place when
        even that does not fit (status.json is not listed while the run is running)."""
        self.remove_temps()
        self._delete_unnamed()
        try:
            self.finish(layout.FAILED, error=message, reason=layout.DISK_FULL)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            if layout.STATUS not in self._listed():
                status = self._status_doc(layout.FAILED, dict(self.state.status_fields(), error=message, phase=None,
                                                              reason=layout.DISK_FULL))
                overwrite_in_place(self.file(layout.STATUS), json_bytes(status))

    def remove_temps(self) -> None:
        for folder in (self.path, self.file(layout.CHECKPOINTS_DIR), self.file(layout.STATS_DIR)):
            for path in _entries(folder):
                if layout.is_temp(path.name):
                    path.unlink(missing_ok=True)
                    faults.point("repair:temp-removed")

    def write_status(self, state_name: str, **fields: Any) -> dict[str, Any]:
        """Rewrite status.json, keeping fields not given from the previous version."""
        # A listed file never changes: status.json is listed only in a final state.
        assert layout.STATUS not in self._listed(), "status.json changed while the manifest lists it"
        status = self._status_doc(state_name, fields)
        atomic_write_bytes(self.file(layout.STATUS), json_bytes(status), failpoint="status:temp")
        return status

    def _status_doc(self, state_name: str, fields: dict[str, Any]) -> dict[str, Any]:
        status = self.read_json(layout.STATUS) or {}
        status.update(fields)
        status.update(state=state_name, updated_at=now_iso(), pid=os.getpid())
        status.setdefault("error", None)
        if state_name != layout.FAILED:
            status["error"] = fields.get("error")
        status["reason"] = fields.get("reason")  # of this failure only: never carried into the next state
        if "interruption" not in fields:  # an interrupted run's notice: never carried into a continued run
            status.pop("interruption", None)
        return status

    def _write_metrics(self) -> None:
        """metrics.jsonl from the committed history: never a duplicate or a partial line."""
        assert layout.METRICS not in self._listed(), "metrics.jsonl changed while the manifest lists it"
        text = "".join(json.dumps(row) + "\n" for row in self.state.history)
        atomic_write_bytes(self.file(layout.METRICS), text.encode(), failpoint="metrics:temp")

    def _best_in_place(self, best: Checkpoint | None) -> bool:
        target = self.file(layout.BEST_WEIGHTS)
        if best is None:
            return not target.exists()
        if self._best_source == best.file:
            return True
        try:  # a hard link is the very file; a copy (no links here) is made again once per start
            return os.path.samefile(target, self.file(best.file))
        except FileNotFoundError:
            return False

    def _derive_best(self, best: Checkpoint | None) -> None:
        """best.weights.h5 := the state's best file (link, or copy), replaced atomically."""
        self._best_source = None
        target = self.file(layout.BEST_WEIGHTS)
        if best is None:
            target.unlink(missing_ok=True)
            return
        with replacing(target) as tmp:
            link_or_copy(self.file(best.file), tmp)
            faults.point("best:temp")
        self._best_source = best.file

    def _delete_unnamed(self) -> None:
        """Checkpoint files the state does not name: superseded, or written but never committed. The
        manifest never lists them (best.weights.h5 is its own name for the inode)."""
        keep = self.state.files()
        for path in _entries(self.file(layout.CHECKPOINTS_DIR)):
            rel = f"{layout.CHECKPOINTS_DIR}/{path.name}"
            if layout.epoch_of(path.name) is not None and rel not in keep:
                path.unlink(missing_ok=True)
                faults.point("publish:deleted")

    # ---- the manifest -----------------------------------------------------------------------

    def _listed(self) -> set[str]:
        if self._listed_cache is None:
            try:
                self._listed_cache = set(layout.parse_manifest(self.file(layout.MANIFEST).read_text()))
            except (OSError, ValueError):
                self._listed_cache = set()
        return self._listed_cache

    def manifest_text(self, best: Checkpoint | None, final: bool) -> str:
        """The manifest rule (trainer/contract/layout.py): best's hash comes from the state; the other
        listed files are small and hashed as they are."""
        lines = []
        for rel in layout.manifest_candidates(final):
            if rel == layout.BEST_WEIGHTS:
                if best is not None:
                    lines.append(layout.manifest_line(best.sha256, rel))
            elif self.file(rel).is_file():
                lines.append(layout.manifest_line(sha256_file(self.file(rel)), rel))
        return "".join(line + "\n" for line in lines)

    def _write_manifest(self, best: Checkpoint | None, final: bool) -> None:
        path = self.file(layout.MANIFEST)
        text = self.manifest_text(best, final)
        try:
            current = path.read_text()
        except FileNotFoundError:
            current = None
        if text == current or (not text and current is None):
            return
        if not text:  # nothing to vouch for (no run.json yet): no manifest rather than an empty one
            path.unlink()
        else:
            atomic_write_bytes(path, text.encode(), failpoint="manifest:temp")
        self._listed_cache = set(layout.parse_manifest(text))


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def peek(self) -> float:
        """Seconds since the last lap, without starting a new one."""
        return time.perf_counter() - self.start

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        return seconds
