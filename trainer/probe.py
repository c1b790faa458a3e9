"""``python -m trainer.probe ROOT``: one JSON object describing the runs under ROOT/runs.

Runs on the training machine (pure Python: no numpy, no TensorFlow), so the orchestrator
learns everything about every run in ONE remote command. A run is ``alive`` only when its
pid exists with the same kernel start time as recorded (pids get reused).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from trainer import layout
from trainer.rundir import process_start_time


def pid_alive(run_dir: Path) -> tuple[int | None, bool]:
    try:
        parts = (run_dir / layout.PID_FILE).read_text().split()
        pid = int(parts[0])
    except (OSError, ValueError, IndexError):
        return None, False
    recorded = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    current = process_start_time(pid)
    if current is not None or recorded is not None:
        return pid, current is not None and current == recorded
    try:  # no /proc (not Linux): existence is all we can check
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid, False
    except PermissionError:
        return pid, True
    return pid, True


def describe_run(run_dir: Path) -> dict[str, Any]:
    def read(rel: str) -> dict[str, Any]:
        try:
            return json.loads((run_dir / rel).read_text())
        except (OSError, ValueError):
            return {}

    status, run = read(layout.STATUS), read(layout.RUN_JSON)
    pid, alive = pid_alive(run_dir)
    return {
        "run_id": run_dir.name,
        "state": status.get("state"),
        "epoch": status.get("epoch"),
        "epochs": status.get("epochs"),
        "val_accuracy": status.get("val_accuracy"),
        "best_val_accuracy": status.get("best_val_accuracy"),
        "best_epoch": status.get("best_epoch"),
        "error": status.get("error"),
        "updated_at": status.get("updated_at"),
        "parent": run.get("parent_run", status.get("parent")),
        "started_at": run.get("started_at"),
        "pid": pid,
        "alive": alive,
    }


def list_runs(root: Path) -> list[dict[str, Any]]:
    runs = root / layout.RUNS_DIR
    if not runs.is_dir():
        return []
    return [describe_run(d) for d in sorted(runs.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainer.probe ROOT", file=sys.stderr)
        return 2
    print(json.dumps({"runs": list_runs(Path(argv[0]))}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
