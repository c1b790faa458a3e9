"""What orch asks about the machine and its runs, each answer ONE record of
trainer/contract/wire.py (verbs: trainer/contract/verbs.py):

    home                                   -> Home
    runs ROOT                              -> RunList: every run under ROOT/runs, with liveness
    host                                   -> Host: nvidia-smi's GPUs and CPU/memory load
    snapshot RUN_DIR METRICS_OFFSET LOG_LINES -> Snapshot: the run, metrics lines from the
                                              offset on, the log's last lines, the host, and
                                              the watcher's rebalance recommendation
    snapshots RUN_DIR IDLE                 -> a Snapshot per question line ``METRICS_OFFSET
                                              LOG_LINES`` on stdin, until stdin ends (or IDLE
                                              seconds pass without a question): monitor's refreshes
    machine ROOT                           -> MachineReport: the host, every run, the autostop
    files RUN_DIR                          -> RunFiles: the manifest and the run's regular files
    started RUN_DIR PID LAUNCHED_AT        -> StartCheck: what a just-launched trainer wrote

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.wire import (
    NVIDIA_QUERY,
    STALL_FLOOR,
    Autostop,
    Epoch,
    Home,
    Host,
    HostLoad,
    MachineReport,
    MirrorReport,
    RunFiles,
    RunInfo,
    RunList,
    Snapshot,
    StartCheck,
    parse_nvidia_smi,
    run_fields,
)
from trainer.machine import readers
from trainer.machine.locks import is_locked
from trainer.machine.proc import bounded_output, pid_alive, process_start_time, started_at, stopped_by_signal
from trainer.machine.readers import read_json

# The files of a run folder orch reads: one that is there but not a regular file breaks the run.
RUN_FILES = (layout.STATUS, layout.RUN_JSON, layout.DEPLOY_JSON, layout.PID_FILE, layout.METRICS, layout.TRAIN_LOG,
             layout.MANIFEST, layout.HEARTBEAT)
MAX_METRICS = 100_000  # rows in one answer (a run has one per epoch)


def broken(run_dir: Path) -> str | None:
    """Why the run folder cannot be read as a run ("status.json is a named pipe"), or None."""
    if run_dir.is_symlink():
        return "the run folder is a link to elsewhere, not a run folder of its own"
    return next((why for why in (readers.problem(run_dir / name) for name in RUN_FILES) if why), None)


def quiet_for(run_dir: Path, pid: int, heartbeat: dict[str, Any], status: dict[str, Any]) -> float | None:
    """Seconds since the trainer's last sign of life: its start, its heartbeat, its last status.
    Only the living process's own count (a continued run's folder holds its predecessor's); its
    start counts only until it has written one of its own."""
    times: list[float] = []
    beat = heartbeat.get("time")
    if heartbeat.get("pid") == pid and isinstance(beat, (int, float)) and beat == beat:
        times.append(float(beat))
    if status.get("pid") == pid:
        with contextlib.suppress(OSError):
            times.append((run_dir / layout.STATUS).stat().st_mtime)
    times = times or [t for t in (started_at(pid),) if t is not None]
    return max(0.0, time.time() - max(times)) if times else None


def stall_after(run_dir: Path, heartbeat: dict[str, Any]) -> float:
    """monitor.stall_seconds as the run was launched with, else the larger of 10 minutes and three
    median epochs."""
    monitor = read_json(run_dir / layout.DEPLOY_JSON).get("monitor")
    given = monitor.get("stall_seconds") if isinstance(monitor, dict) else None
    if isinstance(given, (int, float)) and not isinstance(given, bool) and 0 < given < float("inf"):
        return float(given)
    median = heartbeat.get("median_epoch_seconds")
    return max(STALL_FLOOR, 3 * median) if isinstance(median, (int, float)) else STALL_FLOOR


def describe_run(run_dir: Path, launching: bool = False) -> RunInfo:
    status, run = read_json(run_dir / layout.STATUS), read_json(run_dir / layout.RUN_JSON)
    heartbeat = read_json(run_dir / layout.HEARTBEAT)
    pid, alive = pid_alive(run_dir / layout.PID_FILE)
    anchor = run_dir / layout.DEPLOY_JSON  # written by orch when it creates the run
    try:
        created = (anchor if anchor.exists() else run_dir).stat().st_mtime
    except OSError:
        created = None
    return RunInfo(**run_fields(run_dir.name, status, run),
        created=created, pid=pid, alive=alive, launching=launching, broken=broken(run_dir),
        quiet_for=quiet_for(run_dir, pid, heartbeat, status) if alive and pid is not None else None,
        stall_after=stall_after(run_dir, heartbeat) if alive else None,
        signal_stopped=alive and pid is not None and stopped_by_signal(pid),
        mirror=mirror_report(run_dir),
    )


def mirror_report(run_dir: Path) -> MirrorReport | None:
    report = read_json(run_dir / layout.MIRROR_STATUS)
    return MirrorReport.from_json(report) if report else None


def launching(root: Path) -> bool:
    """Whether a launch holds the machine's lock (a run without a state may be starting)."""
    return is_locked(root / layout.LAUNCH_LOCK)


def list_runs(root: Path) -> list[RunInfo]:
    runs = root / layout.RUNS_DIR
    if not runs.is_dir():
        return []
    busy = launching(root)
    return [describe_run(d, busy) for d in sorted(runs.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def nvidia_smi() -> tuple[list[Any], str | None]:
    """(GPU rows, None) or ([], why there are none). nvidia-smi gets 5 s and 64 KB (64 GPUs
    take 7 KB): a hung driver or a tool that prints without end costs no more than that."""
    try:
        code, text = bounded_output(["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"])
    except FileNotFoundError:
        return [], "no nvidia-smi"
    except OSError as exc:
        return [], str(exc)
    if code is None:
        return [], "nvidia-smi ran too long or printed too much: stopped"
    if code != 0:
        return [], text.strip()[:200] or f"nvidia-smi exited {code}"
    return parse_nvidia_smi(text), None


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


def _metrics(path: Path, offset: int) -> tuple[list[Epoch], int]:
    """metrics.jsonl's rows from line ``offset`` on (at most MAX_METRICS; a line that is not a
    JSON object is left out), and its number of lines."""
    rows: list[Any] = []  # JSON rows: orch reads them as Epoch records
    count = 0
    for count, line in readers.iter_lines(path):
        if count <= offset or line is None or len(rows) >= MAX_METRICS:
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, count


def log_tail(run_dir: Path, lines: int) -> list[str]:
    return readers.tail_lines(run_dir / layout.TRAIN_LOG, lines)


def snapshot(run_dir: Path, metrics_offset: int, log_lines: int) -> Snapshot:
    """Everything one monitor refresh shows."""
    metrics, count = _metrics(run_dir / layout.METRICS, metrics_offset)
    root = run_dir.parent.parent
    return Snapshot(describe_run(run_dir, launching(root)), metrics, count, log_tail(run_dir, log_lines), host(),
                    rebalance_at=rebalance_at(root))


def snapshots(run_dir: Path, idle: float, out: Any) -> int:
    """Answer snapshot questions (``METRICS_OFFSET LOG_LINES``) for as long as orch asks."""
    try:
        for question in out.questions(idle):
            try:
                offset, lines = (int(word) for word in question.split())
            except ValueError:
                raise SystemExit(f"snapshots: not a question: {question[:80]!r}") from None
            out.answer(snapshot(run_dir, offset, lines))
    except BrokenPipeError:  # orch is gone: so is whoever would read a last word
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def rebalance_at(root: Path) -> str | None:
    """When the watcher saw EC2's rebalance recommendation (watcher.json), or None."""
    at = read_json(root / layout.WATCHER_STATE).get("rebalance_at")
    return at if isinstance(at, str) and 0 < len(at) <= 40 and at.isprintable() else None


def autostop(root: Path) -> Autostop:
    """The autostop setting and what the watcher (trainer/machine/watcher.py) last saw."""
    setting, state = read_json(root / layout.AUTOSTOP_SETTING), read_json(root / layout.WATCHER_STATE)
    return Autostop(armed=bool(setting), idle_minutes=setting.get("idle_minutes"), command=setting.get("command"),
                    watcher_alive=is_locked(root / layout.WATCHER_LOCK), idle_since=state.get("idle_since"),
                    stops_at=state.get("stops_at") if setting else None, fired_at=state.get("fired_at"),
                    error=state.get("error") if setting else None, now=time.time())


# Far above what a run holds (tens of files, a manifest of a few KB): beyond, a run is crafted.
MAX_RUN_FILES = 100_000
MAX_MANIFEST_BYTES = 1 << 20


def run_files(run_dir: Path) -> RunFiles:
    """The run, its manifest and its regular files (links are never followed): all that
    `orch download` needs, in one answer."""
    if run_dir.is_symlink() or not run_dir.is_dir():
        return RunFiles()
    run = describe_run(run_dir, launching(run_dir.parent.parent))
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
        data = readers.read_bytes(path, MAX_MANIFEST_BYTES + 1)  # a pipe swapped in meanwhile cannot hang it
    except OSError:
        return None, False
    if len(data) > MAX_MANIFEST_BYTES:
        return None, True
    return data.decode("utf-8", "surrogateescape"), False


def started(run_dir: Path, pid: int, launched_at: float) -> StartCheck:
    """What the trainer launched as ``pid`` has written: its status, and its log's tail. A
    continued run's folder holds the status of the previous process: only the new one's counts,
    known by its pid, which the trainer writes in the pid file itself (an interpreter wrapper
    that runs Python as its child, as ``conda run`` does, launched ``pid``, not the trainer)."""
    status = read_json(run_dir / layout.STATUS)
    trainer, trainer_alive = pid_alive(run_dir / layout.PID_FILE)
    try:
        fresh = (run_dir / layout.STATUS).stat().st_mtime >= launched_at - 1
    except OSError:
        fresh = False
    mine = status.get("pid") == pid or (status.get("pid") == trainer and trainer_alive and fresh)
    alive = trainer_alive or is_locked(run_dir / layout.RUN_LOCK) or _lives(pid)
    return StartCheck(status.get("state") if mine else None, alive, log_tail(run_dir, 15))


def _lives(pid: int) -> bool:
    return process_start_time(pid) is not None  # a zombie is dead: it only waits to be reaped


def run(verb: str, args: list[str], out: Any) -> int:
    """Answer one probe verb (trainer/machine/entry.py)."""
    answers = {
        ("home", 0): lambda: Home(os.path.expanduser("~")),
        ("runs", 1): lambda: RunList(list_runs(Path(args[0]))),
        ("host", 0): host,
        ("snapshot", 3): lambda: snapshot(Path(args[0]), int(args[1]), int(args[2])),
        ("machine", 1): lambda: MachineReport(host(), list_runs(Path(args[0])), autostop(Path(args[0]))),
        ("files", 1): lambda: run_files(Path(args[0])),
        ("started", 3): lambda: started(Path(args[0]), int(args[1]), float(args[2])),
    }
    if (verb, len(args)) == ("snapshots", 2):
        return snapshots(Path(args[0]), float(args[1]), out)
    answer = answers.get((verb, len(args)))
    if answer is None:
        raise SystemExit(f"usage: python3 -m trainer.machine FRAME {verb} ... (see trainer/machine/probe.py)")
    out.answer(answer())
    return 0
