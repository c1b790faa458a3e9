"""What the orchestrator asks the training machine, each answer ONE JSON object (a record of
trainer/wire.py) from ONE remote command. Pure Python: no numpy, no TensorFlow; it needs only
the modules of :data:`MODULES`, which orch can send along with the command (read-only
commands never upload code).

    python -m trainer.probe runs ROOT
        every run under ROOT/runs, with liveness                    -> {"runs": [RunInfo]}
    python -m trainer.probe host
        nvidia-smi's GPUs and CPU/memory load                       -> Host
    python -m trainer.probe snapshot RUN_DIR METRICS_OFFSET LOG_LINES
        status, liveness, metrics lines from METRICS_OFFSET on, the log's last lines, the host
                                                                    -> Snapshot
    python -m trainer.probe machine ROOT
        the host, every run and the autostop                        -> Machine
    python -m trainer.probe files RUN_DIR
        the manifest and the run's regular files with their sizes  -> RunFiles
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from trainer import layout
from trainer.proc import is_locked, pid_alive
from trainer.wire import (
    NVIDIA_QUERY,
    Autostop,
    Host,
    HostLoad,
    Machine,
    RunFiles,
    RunInfo,
    Snapshot,
    parse_nvidia_smi,
)

# What the probe imports: orch sends exactly these when it runs the probe without uploading.
MODULES = ("trainer/__init__.py", "trainer/layout.py", "trainer/proc.py", "trainer/wire.py", "trainer/probe.py")


def read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def describe_run(run_dir: Path, launching: bool = False) -> RunInfo:
    status, run = read_json(run_dir / layout.STATUS), read_json(run_dir / layout.RUN_JSON)
    pid, alive = pid_alive(run_dir / layout.PID_FILE)
    anchor = run_dir / layout.DEPLOY_JSON  # written by orch when it creates the run
    try:
        created = (anchor if anchor.exists() else run_dir).stat().st_mtime
    except OSError:
        created = None
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return RunInfo(
        run_id=run_dir.name, created=created, state=status.get("state"), epoch=status.get("epoch"),
        epochs=status.get("epochs"), val_accuracy=status.get("val_accuracy"),
        best_val_accuracy=status.get("best_val_accuracy"), best_epoch=status.get("best_epoch"),
        error=status.get("error"), updated_at=status.get("updated_at"),
        parent=run.get("parent_run", status.get("parent")),
        parent_best_val_accuracy=status.get("parent_best_val_accuracy", config.get("parent_best_val_accuracy")),
        vs_parent=status.get("vs_parent"), beat_parent=status.get("beat_parent"),
        started_at=run.get("started_at"), pid=pid, alive=alive, launching=launching,
    )


def list_runs(root: Path) -> list[RunInfo]:
    runs = root / layout.RUNS_DIR
    if not runs.is_dir():
        return []
    launching = is_locked(root / layout.LAUNCH_LOCK)
    return [describe_run(d, launching) for d in sorted(runs.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def nvidia_smi() -> tuple[list[Any], str | None]:
    """(GPU rows, None) or ([], why there are none)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return [], "no nvidia-smi"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], str(exc)
    if out.returncode != 0:
        return [], (out.stderr or out.stdout).strip()[:200] or f"nvidia-smi exited {out.returncode}"
    return parse_nvidia_smi(out.stdout), None


def host_load() -> HostLoad:
    try:
        loadavg = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return HostLoad(os.cpu_count(), loadavg, int(meminfo["MemTotal"].split()[0]) // 1024,
                        int(meminfo["MemAvailable"].split()[0]) // 1024)
    except (OSError, KeyError, ValueError):
        return HostLoad(os.cpu_count(), list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def host() -> Host:
    gpus, error = nvidia_smi()
    return Host(gpus, error, host_load())


def snapshot(run_dir: Path, metrics_offset: int, log_lines: int) -> Snapshot:
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
    launching = is_locked(run_dir.parent.parent / layout.LAUNCH_LOCK)
    return Snapshot(describe_run(run_dir, launching), read_json(run_dir / layout.STATUS), metrics, count, tail,
                    host())


def autostop(root: Path) -> Autostop:
    """The autostop setting and what the watcher (trainer/watcher.py) last saw."""
    setting, state = read_json(root / layout.AUTOSTOP_SETTING), read_json(root / layout.WATCHER_STATE)
    return Autostop(armed=bool(setting), idle_minutes=setting.get("idle_minutes"), command=setting.get("command"),
                    watcher_alive=is_locked(root / layout.WATCHER_LOCK), idle_since=state.get("idle_since"),
                    stops_at=state.get("stops_at") if setting else None, fired_at=state.get("fired_at"),
                    now=time.time())


# Far above what a run holds (tens of files, a manifest of a few KB): beyond, a run is crafted.
MAX_RUN_FILES = 100_000
MAX_MANIFEST_BYTES = 1 << 20


def run_files(run_dir: Path) -> RunFiles:
    """The run, its manifest and its regular files (links are never followed): all that
    `orch download` needs, in one answer."""
    if run_dir.is_symlink() or not run_dir.is_dir():
        return RunFiles()
    run = describe_run(run_dir, is_locked(run_dir.parent.parent / layout.LAUNCH_LOCK))
    files: dict[str, int] = {}
    for dirpath, _dirnames, filenames in os.walk(run_dir):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISREG(st.st_mode):
                files[os.path.relpath(path, run_dir)] = st.st_size
                if len(files) > MAX_RUN_FILES:
                    return RunFiles(None, {}, too_big=True, run=run)
    manifest, too_big = _read_manifest(run_dir / layout.MANIFEST)
    return RunFiles(manifest, files, too_big, run)


def _read_manifest(path: Path) -> tuple[str | None, bool]:
    """(text, too big); no text when it is missing or not a regular file."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None, False
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None, False
    if len(data) > MAX_MANIFEST_BYTES:
        return None, True
    return data.decode("utf-8", "surrogateescape"), False


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "runs":
        answer: Any = {"runs": [r.to_json() for r in list_runs(Path(argv[1]))]}
    elif len(argv) == 1 and argv[0] == "host":
        answer = host().to_json()
    elif len(argv) == 4 and argv[0] == "snapshot":
        answer = snapshot(Path(argv[1]), int(argv[2]), int(argv[3])).to_json()
    elif len(argv) == 2 and argv[0] == "machine":
        root = Path(argv[1])
        answer = Machine(host(), list_runs(root), autostop(root)).to_json()
    elif len(argv) == 2 and argv[0] == "files":
        answer = run_files(Path(argv[1])).to_json()
    else:
        print("usage: python -m trainer.probe runs ROOT | host | snapshot RUN_DIR METRICS_OFFSET LOG_LINES | "
              "machine ROOT | files RUN_DIR", file=sys.stderr)
        return 2
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
