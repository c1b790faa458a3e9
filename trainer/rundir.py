"""Writing the run directory (see trainer/layout.py): status, metrics, pid, manifest.

Every file is replaced atomically, so ``orch monitor`` and ``orch download`` never read a
half-written one, and a kill at any moment leaves a consistent directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer import layout
from trainer.fsutil import atomic_write_bytes, atomic_write_json
from trainer.proc import pid_line


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunDir:
    """One run directory, written by the training process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._best_digest: tuple[float, str] | None = None  # (mtime, sha256) of best weights

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

    def write_json(self, rel: str, obj: Any) -> None:
        atomic_write_json(self.file(rel), obj)

    def write_status(self, state: str, **fields: Any) -> dict[str, Any]:
        """Rewrite status.json, keeping fields not given from the previous version."""
        status = self.read_json(layout.STATUS) or {}
        status.update(fields)
        status.update(state=state, updated_at=now_iso(), pid=os.getpid())
        status.setdefault("error", None)
        if state != layout.FAILED:
            status["error"] = fields.get("error")
        self.write_json(layout.STATUS, status)
        return status

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl from the full history: never a duplicate or partial line."""
        text = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write_bytes(self.file(layout.METRICS), text.encode())

    def manifest_files(self) -> list[str]:
        """What ``download`` brings back: best checkpoint, run.json, status, metrics, stats/."""
        rels = [layout.BEST_WEIGHTS, layout.RUN_JSON, layout.STATUS, layout.METRICS]
        stats = self.path / layout.STATS_DIR
        if stats.is_dir():
            rels += sorted(p.relative_to(self.path).as_posix() for p in stats.rglob("*")
                           if p.is_file() and not p.name.startswith("."))
        return [r for r in rels if self.file(r).is_file()]

    def refresh_manifest(self) -> None:
        """MANIFEST.sha256 in sha256sum format; the big checkpoint is re-hashed only if changed."""
        lines = []
        for rel in self.manifest_files():
            path = self.file(rel)
            if rel == layout.BEST_WEIGHTS:
                mtime = path.stat().st_mtime
                if self._best_digest is None or self._best_digest[0] != mtime:
                    self._best_digest = (mtime, sha256_file(path))
                digest = self._best_digest[1]
            else:
                digest = sha256_file(path)
            lines.append(layout.manifest_line(digest, rel))
        atomic_write_bytes(self.file(layout.MANIFEST), ("\n".join(lines) + "\n").encode())


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        return seconds
