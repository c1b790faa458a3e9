"""The autostop watcher's decisions, in-process on a local folder: it survives a full disk, a
failing command keeps it armed (and says so), orch's activity lease keeps the machine busy,
and a lease whose holder vanished lets go."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from trainer.contract import layout
from trainer.machine import watcher


def arm(root: Path, command: str, minutes: float = 0.01) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / layout.AUTOSTOP_SETTING).write_text(json.dumps({"idle_minutes": minutes, "command": command,
                                                            "armed_at": time.time()}))


def start_watcher(root: Path) -> tuple[threading.Thread, list[object]]:
    """watcher.watch in a thread of this process; the list gets its exit code when it ends."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(watcher.watch(root))
        except SystemExit as exc:
            outcome.append(exc.code)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def run_watcher(root: Path, timeout: float = 20) -> int:
    """watcher.watch in a thread of this process, until it fires (it exits) or the timeout."""
    thread, outcome = start_watcher(root)
    thread.join(timeout)
    return outcome[0] if outcome else -1  # type: ignore[return-value]


def test_the_watcher_fires_even_when_it_cannot_write_its_state(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "FIRED"
    arm(tmp_path / "root", f"touch {marker}")

    def disk_full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(watcher, "atomic_write_json", disk_full)
    assert run_watcher(tmp_path / "root") == 0
    assert marker.exists()


def test_a_failing_command_keeps_autostop_armed_and_says_so(tmp_path: Path) -> None:
    from orchestrator.autostop import describe
    from trainer.machine.probe import autostop

    root = tmp_path / "root"
    arm(root, "echo 'sudo: a password is required' >&2; exit 1", minutes=0.01)
    clock = watcher._Clock()
    setting = json.loads((root / layout.AUTOSTOP_SETTING).read_text())
    deadline = time.monotonic() + 10
    while not autostop(root).error and time.monotonic() < deadline:
        clock.step(root, setting)
        time.sleep(0.1)
    state = autostop(root)
    assert state.armed and "exited 1" in state.error and "password is required" in state.error
    assert "FAILED" in describe(state) and "still running" in describe(state)
    assert clock.retry_at is not None  # tried again one idle period later, not in a tight loop


def test_orch_at_work_keeps_the_machine_busy_and_a_vanished_holder_lets_go(tmp_path: Path) -> None:
    from tests.conftest import local_machine
    from trainer.contract import verbs

    root = tmp_path / "root"
    root.mkdir()
    m = local_machine(root)
    assert watcher.busy(root) is None
    with m.busy(ping_every=0.2, silence=1.0):
        deadline = time.monotonic() + 10
        while watcher.busy(root) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.busy(root) == "orch is at work on the machine"
        time.sleep(1.5)  # longer than the silence: the pings keep it held
        assert watcher.busy(root) is not None
    time.sleep(0.5)
    assert watcher.busy(root) is None
    # a holder whose orch vanished (no pings, stdin never closed) lets go after the silence
    held = m.start(verbs.HOLD, root, 1.0)
    time.sleep(0.5)
    assert watcher.busy(root) is not None
    time.sleep(1.5)
    assert watcher.busy(root) is None
    held.close()


def test_logs_keep_a_character_cut_between_two_reads(tmp_path: Path) -> None:
    from orchestrator.config import DeployConfig
    from orchestrator.context import Context
    from orchestrator.runs import logs

    run = tmp_path / "root" / "runs" / "r1"
    run.mkdir(parents=True)
    (run / layout.TRAIN_LOG).write_bytes(b"caf\xc3")  # the first byte of 'é' only
    sleeper = __import__("subprocess").Popen(["sleep", "30"])
    from trainer.machine.proc import pid_line

    (run / layout.PID_FILE).write_text(pid_line(sleeper.pid))
    (run / layout.STATUS).write_text(json.dumps({"state": "running"}))
    cfg = DeployConfig.model_validate({"target": "local", "remote": {"root": str(tmp_path / "root"),
                                                                     "python": sys.executable}})
    out: list[str] = []

    def finish() -> None:
        time.sleep(1.0)  # after the first read
        with open(run / layout.TRAIN_LOG, "ab") as fh:
            fh.write("\u00e9 second line\n".encode()[1:])  # the rest of 'é', then more
        time.sleep(0.5)
        sleeper.kill()
        sleeper.wait()
        (run / layout.STATUS).write_text(json.dumps({"state": "finished"}))

    threading.Thread(target=finish, daemon=True).start()
    logs(Context(cfg), "r1", follow=True, write=out.append)
    assert "".join(out) == "caf\u00e9 second line\n"


def test_lock_and_state_files_are_the_login_users_alone(tmp_path: Path) -> None:
    """Another unix user on the machine can neither take orch's locks nor read its state."""
    import stat as st

    from trainer.machine.locks import open_lock

    root = tmp_path / "root"
    root.mkdir()
    old = root / layout.LAUNCH_LOCK
    old.write_text("")
    old.chmod(0o644)  # as an older orch left it
    os.close(open_lock(old))
    watcher.arm(root, 30, "true", Path(__file__).resolve().parents[2])
    try:
        for name in (layout.LAUNCH_LOCK, layout.AUTOSTOP_SETTING, layout.WATCHER_LOG, layout.WATCHER_LOCK):
            assert st.S_IMODE((root / name).stat().st_mode) == 0o600, name
    finally:
        watcher.disarm(root)


def test_a_lock_held_only_by_another_user_is_ignored_and_logged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    hold = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_SH)\n"
            "if sys.argv[2] == 'demote':\n    os.setuid(65534)\nprint('held', flush=True)\ntime.sleep(60)\n")
    lock = root / layout.ACTIVITY_LOCK
    lock.write_text("")
    lock.chmod(0o644)  # readable: what an older orch left, before its locks were 0600
    demote = os.geteuid() == 0  # a real other user where we can be one
    holder = __import__("subprocess").Popen([sys.executable, "-c", hold, str(lock), "demote" if demote else "-"],
                                            stdout=-1, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        me = os.getuid()
        if not demote:  # the holder is ours: the same check, seen as another user would be
            assert watcher.busy(root) == "orch is at work on the machine"
            me = os.getuid() + 1
        assert watcher.busy(root, uid=me) is None
        logged = (root / layout.WATCHER_LOG).read_text()
        assert "ignoring activity.lock: held by pid" in logged or "replaced activity.lock by a 0600 one" in logged
    finally:
        holder.kill()
        holder.wait()


def test_a_run_that_wrote_its_final_state_keeps_the_machine_busy_until_its_trainer_exits(tmp_path: Path) -> None:
    """After `finished` the trainer still uploads its final state (up to mirror.FINAL_WAIT): an
    autostop then would lose it, so the machine is idle only once the process is gone."""
    import subprocess

    from trainer.machine.proc import pid_line

    run_dir = tmp_path / "root" / layout.RUNS_DIR / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / layout.STATUS).write_text(json.dumps({"state": layout.FINISHED}))
    trainer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (run_dir / layout.PID_FILE).write_text(pid_line(trainer.pid))
        assert watcher.busy(tmp_path / "root") == "run r1 is ending (its trainer has not exited yet)"
    finally:
        trainer.communicate(b"")
    assert watcher.busy(tmp_path / "root") is None
