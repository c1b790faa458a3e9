"""Start a trainer on the machine, detached, as ONE atomic step (run by orch over SSH):

    python -m trainer.launch ROOT RUN_ID (--fresh | --continue) [--force] --python PY --code DIR \\
        --data-dir DATA [-- TRAINER_OPTIONS...]      (deploy.json on stdin with --fresh)

Under an flock on ROOT/launch.lock (one launch at a time per machine; the lock dies with this
process): check that no run is active (unless --force), create (or check) the run folder,
start ``python -m trainer train`` in its own session with SIGHUP ignored (it outlives the SSH
session), and write its pid file before letting go of the lock, so the next launch's busy
check already sees it. Prints one JSON line: {"pid": N} or {"error": KIND, "message": ...}.
Pure Python: it runs with whatever interpreter the machine has.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer import layout
from trainer.exitcodes import ExitCode
from trainer.fsutil import atomic_write_bytes
from trainer.probe import describe_run, list_runs
from trainer.proc import is_locked, pid_line

LOCK_WAIT = 60.0  # seconds to wait for another launch on this machine to finish


class Refused(Exception):
    def __init__(self, kind: str, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.kind, self.code = kind, code


def _lock(root: Path) -> int:
    """Take ROOT/launch.lock, waiting a while for a launch in progress; the fd holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / layout.LAUNCH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Refused("busy", f"another launch on this machine has held {layout.LAUNCH_LOCK} for "
                              f"{LOCK_WAIT:.0f} s", ExitCode.BUSY) from None
            time.sleep(0.1)


def _check(root: Path, run_dir: Path, fresh: bool, force: bool) -> None:
    active = [r.run_id for r in list_runs(root) if r.active]
    if fresh:
        if active and not force:
            raise Refused("busy", f"run {', '.join(active)} is still running", ExitCode.BUSY)
        if run_dir.exists():
            raise Refused("exists", f"run {run_dir.name} already exists", ExitCode.USAGE)
        return
    run = describe_run(run_dir)
    if not run_dir.is_dir():
        raise Refused("missing", f"no run {run_dir.name}", ExitCode.USAGE)
    # The run lock is the surest sign of a live trainer (started by orch or by hand).
    if run.alive or is_locked(run_dir / layout.RUN_LOCK):
        raise Refused("busy", f"run {run.run_id} is still running (pid {run.pid})", ExitCode.BUSY)
    others = [a for a in active if a != run.run_id]
    if others and not force:
        raise Refused("busy", f"run {', '.join(others)} is still running", ExitCode.BUSY)


def _start(args: argparse.Namespace, run_dir: Path, deploy_json: bytes | None) -> int:
    if deploy_json is not None:
        run_dir.mkdir(parents=True)
        atomic_write_bytes(run_dir / layout.DEPLOY_JSON, deploy_json)
    argv = [args.python, "-m", "trainer", "train", "--data-dir", args.data_dir, "--run-dir", str(run_dir),
            *args.trainer_options]
    env = dict(os.environ, PYTHONPATH=args.code, PYTHONUNBUFFERED="1")
    # A fresh run's log starts empty; a continued run appends to its log.
    with open(run_dir / layout.TRAIN_LOG, "ab" if deploy_json is None else "wb") as log:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: the trainer ignores hang-ups (nohup)
        child = subprocess.Popen(argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # setsid
    atomic_write_bytes(run_dir / layout.PID_FILE, pid_line(child.pid).encode())
    return child.pid


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.launch")
    parser.add_argument("root")
    parser.add_argument("run_id")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fresh", action="store_true")
    mode.add_argument("--continue", dest="fresh", action="store_false")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--python", required=True)
    parser.add_argument("--code", required=True)
    parser.add_argument("--data-dir", required=True)
    # Everything after `--` is the trainer's: split by hand (argparse would take it for positionals).
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.trainer_options = argv[cut + 1:]
    root = Path(args.root)
    run_dir = Path(layout.run_dir(args.root, args.run_id))
    deploy_json = sys.stdin.buffer.read() if args.fresh else None
    try:
        fd = _lock(root)
        try:
            _check(root, run_dir, args.fresh, args.force)
            pid = _start(args, run_dir, deploy_json)
        finally:
            os.close(fd)
    except Refused as exc:
        print(json.dumps({"error": exc.kind, "message": str(exc)}))
        return int(exc.code)
    print(json.dumps({"pid": pid}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
