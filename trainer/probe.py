"""What the orchestrator asks the training machine, each answer ONE JSON object from ONE
remote command (pure Python: no numpy, no TensorFlow):

    python -m trainer.probe runs ROOT
        every run under ROOT/runs, with liveness
    python -m trainer.probe host
        nvidia-smi's CSV and CPU/memory load
    python -m trainer.probe snapshot RUN_DIR METRICS_OFFSET LOG_LINES
        status, liveness, metrics lines from METRICS_OFFSET on, the log's last lines,
        nvidia-smi's CSV (or CPU/memory load where there is no GPU)

A run is ``alive`` only when its pid exists with the same kernel start time as recorded
(pids get reused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
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
    anchor = run_dir / layout.DEPLOY_JSON  # written by orch when it creates the run
    try:
        created = (anchor if anchor.exists() else run_dir).stat().st_mtime
    except OSError:
        created = None
    return {
        "run_id": run_dir.name,
        "created": created,
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


NVIDIA_QUERY = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"


def nvidia_smi() -> dict[str, Any]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return {"csv": None, "error": "no nvidia-smi"}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"csv": None, "error": str(exc)}
    if out.returncode != 0:
        return {"csv": None, "error": (out.stderr or out.stdout).strip()[:200]}
    return {"csv": out.stdout, "error": None}


def host_load() -> dict[str, Any]:
    load: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        load["loadavg"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        load["mem_total_mb"] = int(meminfo["MemTotal"].split()[0]) // 1024
        load["mem_available_mb"] = int(meminfo["MemAvailable"].split()[0]) // 1024
    except (OSError, KeyError, ValueError):
        load.setdefault("loadavg", list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    return load


def snapshot(run_dir: Path, metrics_offset: int, log_lines: int) -> dict[str, Any]:
    """Everything one monitor refresh shows."""
    metrics: list[Any] = []
    count = 0
    try:
        with open(run_dir / layout.METRICS) as fh:
            for count, line in enumerate(fh, 1):
                if count > metrics_offset and line.strip():
                    metrics.append(json.loads(line))
    except (OSError, ValueError):
        pass
    try:
        with open(run_dir / layout.TRAIN_LOG, errors="replace") as fh:
            tail = [line.rstrip("\n") for line in deque(fh, maxlen=log_lines)]
    except OSError:
        tail = []
    try:
        status = json.loads((run_dir / layout.STATUS).read_text())
    except (OSError, ValueError):
        status = {}
    return {"run": describe_run(run_dir), "status": status, "metrics": metrics, "metrics_count": count,
            "log_tail": tail, "nvidia_smi": nvidia_smi(), "load": host_load()}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "runs":
        print(json.dumps({"runs": list_runs(Path(argv[1]))}))
        return 0
    if len(argv) == 1 and argv[0] == "host":
        print(json.dumps({"nvidia_smi": nvidia_smi(), "load": host_load()}))
        return 0
    if len(argv) == 4 and argv[0] == "snapshot":
        print(json.dumps(snapshot(Path(argv[1]), int(argv[2]), int(argv[3]))))
        return 0
    print("usage: python -m trainer.probe runs ROOT | host | snapshot RUN_DIR METRICS_OFFSET LOG_LINES",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
