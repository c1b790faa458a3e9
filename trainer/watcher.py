"""Autostop, on the machine: a small detached process (one per machine) that runs a command
(``sudo shutdown -h now`` by default) once no run has been active for N minutes. It lives on
the machine, so a closed laptop or a dropped SSH connection does not matter.

    python -m trainer.watcher ROOT arm --idle-minutes N --command CMD
        write the setting and make sure a watcher runs (each deploy re-arms: the idle clock
        starts again, with the newest setting)
    python -m trainer.watcher ROOT disarm
    python -m trainer.watcher ROOT status      -> one JSON object
    python -m trainer.watcher ROOT run         (the watcher itself; `arm` starts it detached)

Files under ROOT: autostop.json (the setting), watcher.json (what the watcher last saw: idle
since, stops at), watcher.log (its decisions), watcher.lock (held by the running watcher: a
second one exits at once). Idleness is judged from run states and process liveness (the
probe's), not from a timer alone. Pure Python.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer import layout
from trainer.fsutil import atomic_write_json
from trainer.probe import autostop, list_runs, read_json
from trainer.proc import is_locked

SETTING, STATE = layout.AUTOSTOP_SETTING, layout.WATCHER_STATE
LOG, LOCK = layout.WATCHER_LOG, layout.WATCHER_LOCK


def log(root: Path, message: str) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(root / LOG, "a") as fh:
        fh.write(f"{stamp} {message}\n")


def arm(root: Path, idle_minutes: float, command: str) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / SETTING, {"idle_minutes": idle_minutes, "command": command, "armed_at": time.time()})
    log(root, f"armed: run {command!r} after {idle_minutes:g} idle minutes")
    if not is_locked(root / LOCK):
        _start(root)
    return status(root)


def disarm(root: Path) -> dict[str, Any]:
    if (root / SETTING).exists():
        (root / SETTING).unlink()
        log(root, "disarmed")
    return status(root)


def _start(root: Path) -> None:
    """The watcher, detached: its own session, no terminal, no SSH channel held open."""
    with open(os.devnull, "rb") as devnull, open(root / LOG, "ab") as out:
        subprocess.Popen([sys.executable, "-m", "trainer.watcher", str(root), "run"], stdin=devnull, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    deadline = time.monotonic() + 10
    while not is_locked(root / LOCK) and time.monotonic() < deadline:
        time.sleep(0.05)  # `status` right after `arm` should find it running


def status(root: Path) -> dict[str, Any]:
    return asdict(autostop(root))


def run(root: Path) -> int:
    """The watcher's loop: look, decide, log; run the command once when idle long enough."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # one watcher per machine: it will see the new setting
    log(root, f"watcher started (pid {os.getpid()})")
    idle_since: float | None = None
    while True:
        setting = read_json(root / SETTING)
        if not setting:
            log(root, "no autostop setting: the watcher exits")
            return 0
        now = time.time()
        if any(r.active for r in list_runs(root)):
            idle_since = None
        else:  # a new arming (a deploy) starts the idle clock again
            idle_since = max(idle_since or now, float(setting.get("armed_at", now)))
        idle = float(setting["idle_minutes"]) * 60
        stops_at = idle_since + idle if idle_since is not None else None
        atomic_write_json(root / STATE, {"pid": os.getpid(), "checked_at": now, "idle_since": idle_since,
                                         "stops_at": stops_at, "fired_at": None})
        if stops_at is not None and now >= stops_at:
            return _fire(root, setting, idle_since or now)
        time.sleep(min(30.0, max(0.2, idle / 20)))


def _fire(root: Path, setting: dict[str, Any], idle_since: float) -> int:
    command = str(setting["command"])
    log(root, f"no run active for {(time.time() - idle_since) / 60:.1f} min: running {command!r}")
    (root / SETTING).unlink(missing_ok=True)  # once: a later deploy arms it again
    atomic_write_json(root / STATE, {"pid": os.getpid(), "checked_at": time.time(), "idle_since": idle_since,
                                     "stops_at": None, "fired_at": time.time()})
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True)
    log(root, f"{command!r} exited {done.returncode} {(done.stdout + done.stderr).strip()[-300:]}")
    return 0


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m trainer.watcher")
    parser.add_argument("root", type=Path)
    sub = parser.add_subparsers(dest="action", required=True)
    a = sub.add_parser("arm")
    a.add_argument("--idle-minutes", type=float, required=True)
    a.add_argument("--command", required=True)
    for name in ("disarm", "status", "run"):
        sub.add_parser(name)
    args = parser.parse_args(argv)
    if args.action == "run":
        return run(args.root)
    doc = {"arm": lambda: arm(args.root, args.idle_minutes, args.command), "disarm": lambda: disarm(args.root),
           "status": lambda: status(args.root)}[args.action]()
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
