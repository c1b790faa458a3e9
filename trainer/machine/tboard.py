"""The one TensorBoard of a remote.root (verb ``tensorboard``), shared by the `orch tensorboard`
commands that use it:

    tensorboard ROOT PYTHON PORT ANY KEEP SILENCE RUN_ID...

lives as long as the command that runs it. It holds ROOT/tensorboard.users.lock (shared) for
its whole life, then, under ROOT/tensorboard.lock, reuses the TensorBoard recorded in
tensorboard.json when it lives (pid and kernel start time checked) and serves the same runs, or
starts one: ``PYTHON`` (the training interpreter, which has TensorBoard) bound to 127.0.0.1 on
PORT (0, or PORT taken and ANY: a free one), in a session of its own, detached, without
TensorFlow (TensorBoard's own reader: it starts in seconds and takes no GPU memory beside a
run). Its answer (wire.TensorBoardAnswer) comes once TensorBoard accepts connections. Then it
waits while orch pings (a byte on stdin at least every SILENCE seconds; EOF or silence: the
command has ended) or until TensorBoard exits, and goes: unless KEEP, the TensorBoard is
stopped (its whole process group) when no other command holds the users lock. Its last
progress line says what became of it: stopped, kept, in use, exited. Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.wire import TensorBoardAnswer
from trainer.machine import proc
from trainer.machine.fsutil import atomic_write_json
from trainer.machine.locks import lock, open_lock, try_lock
from trainer.machine.readers import read_json, tail_lines

START_WAIT = 180.0  # seconds for TensorBoard to accept connections (it reads no event file before that)
STOP_WAIT = 5.0  # seconds between SIGTERM and SIGKILL (TensorBoard needs about 2)
# TensorBoard without TensorFlow: it looks for this module first and then uses its own stub
# (it reads event files all the same), instead of importing TensorFlow for half a minute.
LAUNCHER = ("import sys, types; sys.modules['tensorboard.compat.notf'] = types.ModuleType('tensorboard.compat.notf'); "
            "sys.argv[0] = 'tensorboard'; from tensorboard.main import run_main; run_main()")


def logdirs(root: Path, run_ids: list[str]) -> list[list[str]]:
    """[name, folder] of each run's event files (run ids checked: they name folders)."""
    for run_id in run_ids:
        if not layout.is_run_id(run_id):
            raise ValueError(f"not a run id: {run_id!r}")
    return [[run_id, str(Path(layout.run_dir(str(root), run_id)) / layout.TENSORBOARD_DIR)] for run_id in run_ids]


def _state(root: Path) -> dict[str, Any]:
    return read_json(root / layout.TENSORBOARD_STATE)


def _alive(state: dict[str, Any]) -> bool:
    pid, start = state.get("pid"), state.get("start")
    return isinstance(pid, int) and pid > 0 and start is not None and proc.process_start_time(pid) == start


def _stop(root: Path, state: dict[str, Any]) -> None:
    """SIGTERM the recorded TensorBoard's process group (only while it is still that process),
    SIGKILL it after STOP_WAIT seconds; forget it."""
    pid = state.get("pid")
    if _alive(state):
        for sig, wait in ((signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, STOP_WAIT)):
            with contextlib.suppress(OSError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while _alive(state) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)  # our own child, when this very command started it
                time.sleep(0.05)
            if not _alive(state):
                break
    with contextlib.suppress(FileNotFoundError):
        (root / layout.TENSORBOARD_STATE).unlink()


def _has_tensorboard(python: str) -> bool:
    code, _ = proc.bounded_output([python, "-c", "import importlib.util, sys; "
                                   "sys.exit(importlib.util.find_spec('tensorboard') is None)"], timeout=60)
    return code == 0


def _port(wanted: int, any_port: bool) -> int | None:
    """``wanted`` if it is free (0: any), else a free one when ``any_port``; None: taken."""
    for port in ([wanted] if wanted else []) + ([0] if any_port or not wanted else []):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    return None


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _start(root: Path, python: str, port: int, dirs: list[list[str]]) -> TensorBoardAnswer:
    spec = ",".join(f"{name}:{folder}" for name, folder in dirs)
    log_path = root / layout.TENSORBOARD_LOG
    with open(log_path, "wb") as log:
        child = subprocess.Popen([python, "-c", LAUNCHER, "--logdir_spec", spec, "--host", "127.0.0.1",
                                  "--port", str(port)], cwd=str(root), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    state = {"pid": child.pid, "start": proc.process_start_time(child.pid), "port": port, "logdirs": dirs,
             "python": python, "started_at": time.time()}
    atomic_write_json(root / layout.TENSORBOARD_STATE, state)
    deadline = time.monotonic() + START_WAIT
    while child.poll() is None and time.monotonic() < deadline:
        if _listening(port):
            return TensorBoardAnswer(port=port, pid=child.pid)
        time.sleep(0.1)
    why = "exited" if child.poll() is not None else f"did not answer within {START_WAIT:.0f} s"
    _stop(root, state)
    last = " | ".join(tail_lines(log_path, 3)) or "nothing"
    return TensorBoardAnswer(error="failed", message=f"TensorBoard {why} (its last words, in {log_path}: {last})")


def ensure(root: Path, python: str, port: int, any_port: bool, dirs: list[list[str]], users: int) -> TensorBoardAnswer:
    """The running TensorBoard for ``dirs`` (reused, or started), under the state lock."""
    state = _state(root)
    if _alive(state):
        if state.get("logdirs") == dirs and state.get("python") == python:
            return TensorBoardAnswer(port=state.get("port"), pid=state.get("pid"), reused=True)
        alone = try_lock(users)  # shared -> exclusive: no other command uses it
        fcntl.flock(users, fcntl.LOCK_SH)  # back to shared (a failed conversion lets go: take it again)
        if not alone:
            shown = ", ".join(name for name, _ in state.get("logdirs") or []) or "other runs"
            return TensorBoardAnswer(error="busy", message=f"TensorBoard there serves {shown} to another `orch "
                                     "tensorboard`: end that one, or ask for the same runs")
        _stop(root, state)
    if not _has_tensorboard(python):
        return TensorBoardAnswer(error="missing", message=f"TensorBoard is not installed for {python}")
    chosen = _port(port, any_port)
    if chosen is None:
        return TensorBoardAnswer(error="port", message=f"port {port} is taken on this machine")
    return _start(root, python, chosen, dirs)


def _wait(silence: float, state: dict[str, Any]) -> bool:
    """While orch pings and TensorBoard lives (looked at every second); False when it exited."""
    heard = time.monotonic()
    while _alive(state):
        if select.select([0], [], [], 1.0)[0]:
            if not os.read(0, 64):
                return True  # EOF: the command has ended
            heard = time.monotonic()
        elif time.monotonic() - heard > silence:
            return True  # orch went silent: gone without closing the connection
    return False


class _Ended(Exception):
    """SIGTERM: end as when the command ends."""


def _ended(_signum: int, _frame: Any) -> None:
    raise _Ended


def serve(root: Path, python: str, port: int, any_port: bool, keep: bool, silence: float, run_ids: list[str],
          out: Any) -> int:
    # It ends when orch's command does (EOF, silence), never on a terminal's signals: on target
    # local, Ctrl-C reaches this process too, and must not leave TensorBoard behind.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ended)
    root.mkdir(parents=True, exist_ok=True)
    dirs = logdirs(root, run_ids)
    users = lock(root / layout.TENSORBOARD_USERS, shared=True)
    assert users is not None  # no wait given: it waits for as long as it takes
    try:
        held = lock(root / layout.TENSORBOARD_LOCK)
        try:
            answer = ensure(root, python, port, any_port, dirs, users)
            state = _state(root)
        finally:
            if held is not None:
                os.close(held)
        out.answer(answer)
        if answer.error is not None:
            return 0
        try:
            lives = _wait(silence, state)
        except _Ended:
            lives = True
    finally:
        os.close(users)
    if not lives:
        out.progress(f"exited: {' | '.join(tail_lines(root / layout.TENSORBOARD_LOG, 3))}")
        return 0
    if keep:
        out.progress("kept")
        return 0
    held = lock(root / layout.TENSORBOARD_LOCK)
    try:
        others = open_lock(root / layout.TENSORBOARD_USERS)
        try:
            if not try_lock(others):
                out.progress("in use")
                return 0
            _stop(root, _state(root))  # what is recorded now: a TensorBoard nobody uses
        finally:
            os.close(others)
    finally:
        if held is not None:
            os.close(held)
    out.progress("stopped")
    return 0


def run(verb: str, argv: list[str], out: Any) -> int:
    root, python, port, any_port, keep, silence, *run_ids = argv
    return serve(Path(root), python, int(port), any_port == "1", keep == "1", float(silence), run_ids, out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run through python3 -m trainer.machine FRAME tensorboard ...")
