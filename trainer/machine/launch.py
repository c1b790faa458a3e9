"""Starting and stopping trainers on the machine (verbs ``launch`` and ``signal``):

    launch ROOT RUN_ID (--fresh | --continue) [--force] --python PY --code DIR --data-dir DATA
           [--autostop-minutes M --autostop-command CMD | --autostop-off] [--spot-metadata-url URL]
           [--notify-bytes N] [-- TRAINER_OPTIONS...]
           (stdin: N bytes of notify settings, then deploy.json with --fresh)      -> LaunchAnswer
    signal RUN_DIR                          SIGTERM the run's trainer             -> Signalled

A launch is ONE atomic step under an flock on ROOT/launch.lock (one launch at a time per
machine; the lock dies with this process): check that no run is active (unless --force), create
(or check) the run folder, start ``python -m trainer train`` in its own session with SIGHUP
ignored (it outlives the SSH session), and write its pid file before letting go of the lock, so
the next launch's busy check already sees it. Autostop is armed (or disarmed) in the same step,
before the trainer starts: whatever fails after the launch, a machine left to itself stops. On a
spot instance (orch passes ``--spot-metadata-url``) spot watching is set in the same step too, so
the watcher is asking IMDS for notices before the trainer starts. The run's webhook settings
(trainer/contract/notify.py) are kept in a 0600 file the trainer is pointed at, or removed when a
launch brings none. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.exitcodes import ExitCode
from trainer.contract.notify import SETTINGS_ENV
from trainer.contract.verbs import LOG_FILTER, NO_FRAME
from trainer.contract.wire import Autostop, LaunchAnswer, Signalled
from trainer.machine import watcher
from trainer.machine.fsutil import atomic_write_bytes
from trainer.machine.locks import is_locked, lock
from trainer.machine.probe import describe_run, list_runs
from trainer.machine.proc import pid_alive, pid_line

LOCK_WAIT = 60.0  # seconds to wait for another launch on this machine to finish


class Refused(Exception):
    def __init__(self, kind: str, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.kind, self.code = kind, code


def _lock(root: Path) -> int:
    """Take ROOT/launch.lock, waiting a while for a launch in progress; the fd holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = lock(root / layout.LAUNCH_LOCK, wait=LOCK_WAIT)
    if fd is None:
        raise Refused("busy", f"another launch on this machine has held {layout.LAUNCH_LOCK} for {LOCK_WAIT:.0f} s",
                      ExitCode.BUSY)
    return fd


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
    if run.broken:
        raise Refused("broken", f"run {run.run_id} cannot be continued: {run.broken}", ExitCode.REMOTE)
    # The run lock is the surest sign of a live trainer (started by orch or by hand).
    if run.alive or is_locked(run_dir / layout.RUN_LOCK):
        raise Refused("busy", f"run {run.run_id} is still running (pid {run.pid})", ExitCode.BUSY)
    others = [a for a in active if a != run.run_id]
    if others and not force:
        raise Refused("busy", f"run {', '.join(others)} is still running", ExitCode.BUSY)


def _notify_settings(root: Path, run_id: str, settings: bytes) -> Path | None:
    """The run's webhook settings in their 0600 file (folder 0700: the URL is a credential), or
    none at all (a launch without them: an earlier launch's must not fire)."""
    path = Path(layout.notify_settings(str(root), run_id))
    if not settings:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    atomic_write_bytes(path, settings, mode=0o600)
    return path


def _start(args: argparse.Namespace, run_dir: Path, deploy_json: bytes | None, notify: Path | None = None) -> int:
    if deploy_json is not None:
        run_dir.mkdir(parents=True)
        atomic_write_bytes(run_dir / layout.DEPLOY_JSON, deploy_json)
    argv = [args.python, "-m", "trainer", "train", "--data-dir", args.data_dir, "--run-dir", str(run_dir),
            *args.trainer_options]
    env = dict(os.environ, PYTHONPATH=args.code, PYTHONUNBUFFERED="1")
    env.pop(SETTINGS_ENV, None)
    if notify is not None:  # where, not what: the URL itself is never on a command line or in the environment
        env[SETTINGS_ENV] = str(notify)
    fresh = deploy_json is not None
    logs = [_open_log(run_dir, name, fresh) for name in (layout.TRAIN_LOG, layout.RAW_LOG)]
    # The trainer writes into a pipe; the log filter beside it stamps its lines into train.log
    # and keeps every byte in train.raw.log (trainer/machine/logfilter.py).
    read_end, write_end = os.pipe()
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited: both ignore hang-ups (nohup)
        start_log_filter(args.code, read_end, *logs)
        child = subprocess.Popen(argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=write_end,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # setsid
    finally:
        for fd in (read_end, write_end, *logs):
            os.close(fd)
    atomic_write_bytes(run_dir / layout.PID_FILE, pid_line(child.pid).encode())
    return child.pid


def start_log_filter(code: str, stdin: int, log: int, raw: int) -> subprocess.Popen[bytes]:
    """The log filter (trainer/machine/logfilter.py) reading ``stdin`` into train.log (``log``)
    and train.raw.log (``raw``), in a session of its own."""
    return subprocess.Popen([sys.executable, "-S", "-m", "trainer.machine", NO_FRAME, LOG_FILTER.name, str(raw)],
                            cwd=code, stdin=stdin, stdout=log, stderr=log, pass_fds=(raw,), start_new_session=True)


def _open_log(run_dir: Path, name: str, fresh: bool) -> int:
    """A log of the run, for appending (a fresh run's starts empty); only a regular file: a named
    pipe or a link there cannot block or redirect the launch."""
    # Always O_APPEND: a restore from storage may rewrite train.log longer, and the filter's next line goes at its end.
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_APPEND | (os.O_TRUNC if fresh else 0)
    try:
        fd = os.open(run_dir / name, flags, 0o666)
    except OSError as exc:
        raise Refused("broken", f"run {run_dir.name}: cannot open {name}: {exc.strerror}", ExitCode.REMOTE) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("broken", f"run {run_dir.name}: {name} is not a regular file", ExitCode.REMOTE)
    os.set_blocking(fd, True)
    return fd


def _autostop(args: argparse.Namespace, root: Path) -> Autostop | None:
    """The autostop the launch asks for, set while the launch lock makes the machine busy."""
    if args.autostop_off:
        return watcher.disarm(root)
    if args.autostop_minutes is not None:
        return watcher.arm(root, args.autostop_minutes, args.autostop_command or "sudo shutdown -h now",
                           Path(args.code))
    return None


def _spot(args: argparse.Namespace, root: Path) -> None:
    """Spot watching, set (and its watcher started) while the launch lock is held."""
    if args.spot_metadata_url:
        watcher.watch_spot(root, args.spot_metadata_url, Path(args.code))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m trainer.machine FRAME launch")
    parser.add_argument("root")
    parser.add_argument("run_id")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fresh", action="store_true")
    mode.add_argument("--continue", dest="fresh", action="store_false")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--python", required=True)
    parser.add_argument("--code", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--autostop-minutes", type=float)
    parser.add_argument("--autostop-command")
    parser.add_argument("--autostop-off", action="store_true")
    parser.add_argument("--spot-metadata-url", help="a spot instance: the watcher asks this IMDS for notices")
    parser.add_argument("--notify-bytes", type=int, default=0, help="stdin starts with this many bytes of the "
                        "run's webhook settings")
    return parser


def launch(argv: list[str]) -> tuple[LaunchAnswer, int]:
    # Everything after `--` is the trainer's: split by hand (argparse would take it for positionals).
    cut = argv.index("--") if "--" in argv else len(argv)
    args = _parser().parse_args(argv[:cut])
    args.trainer_options = argv[cut + 1:]
    root = Path(args.root)
    run_dir = Path(layout.run_dir(args.root, args.run_id))
    given = sys.stdin.buffer.read() if args.fresh or args.notify_bytes > 0 else b""
    notify, deploy_json = given[:max(0, args.notify_bytes)], given[max(0, args.notify_bytes):] if args.fresh else None
    try:
        fd = _lock(root)
        try:
            _check(root, run_dir, args.fresh, args.force)
            _spot(args, root)  # first: a disarmed autostop never lets the watcher exit before spot watching is set
            armed = _autostop(args, root)
            launched_at = time.time()
            pid = _start(args, run_dir, deploy_json, _notify_settings(root, args.run_id, notify))
            return LaunchAnswer(pid=pid, autostop=armed, launched_at=launched_at), 0
        finally:
            os.close(fd)
    except Refused as exc:
        return LaunchAnswer(error=exc.kind, message=str(exc)), int(exc.code)


def stop_run(run_dir: Path) -> Signalled:
    """SIGTERM the run's trainer, if the recorded pid still is that trainer (start time checked:
    a reused pid is never signalled)."""
    pid, alive = pid_alive(run_dir / layout.PID_FILE)
    if pid is None or not alive:
        return Signalled(False, pid, f"run {run_dir.name} is not running")
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as exc:
        return Signalled(False, pid, f"cannot signal pid {pid}: {exc.strerror}")
    return Signalled(True, pid)


def run(verb: str, args: list[str], out: Any) -> int:
    if verb == "signal":
        out.answer(stop_run(Path(args[0])))
        return 0
    answer, code = launch(args)
    out.answer(answer)
    return code
