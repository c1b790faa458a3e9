"""The machine's watcher: a small detached process (one per machine) for what must happen while
nobody is connected. It lives on the machine, so a closed laptop or a dropped SSH connection does
not matter.

- Autostop: runs a command (``sudo shutdown -h now`` by default) once no run has been active for
  N minutes.
- Spot notices (a spot instance, trainer/machine/imds.py): every 5 s it asks IMDSv2 whether EC2
  is about to take the instance back. On an instance-action notice it writes
  ``<run_dir>/interruption.json`` for every active run, then SIGTERMs its trainer (once per
  notice per run): the trainer commits, uploads to storage and ends ``interrupted``. A rebalance
  recommendation is recorded (watcher.json ``rebalance_at``) and logged, nothing more.

    autostop ROOT arm --idle-minutes N --command CMD --code DIR                  -> Autostop
        write the setting and make sure a watcher runs, started from the code version in DIR
        (each deploy re-arms: the idle clock starts again, with the newest setting)
    autostop ROOT disarm | status | wake [--code DIR]                            -> Autostop
    watch ROOT          the watcher itself (`arm`, `watch_spot` and `wake` start it detached)

Files under ROOT: autostop.json and spot.json (the settings: the watcher exits when neither is
there), watcher.json (what the watcher last saw: idle since, stops at, the rebalance
recommendation), watcher.log (its decisions), watcher.lock (held by the running watcher: a second
one exits at once). Idleness is judged from run states and process liveness (the probe's), not
from a timer alone. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.verbs import NO_FRAME, WATCH
from trainer.contract.wire import Autostop, Interruption
from trainer.machine.fsutil import atomic_write_json
from trainer.machine.imds import Imds, ImdsError
from trainer.machine.locks import MODE as PRIVATE
from trainer.machine.locks import foreign_holders, is_locked, lock, open_lock, tighten, try_lock
from trainer.machine.probe import autostop, list_runs, read_json

SETTING, STATE = layout.AUTOSTOP_SETTING, layout.WATCHER_STATE
LOG, LOCK = layout.WATCHER_LOG, layout.WATCHER_LOCK
SPOT = layout.SPOT_SETTING
SPOT_POLL = 5.0  # seconds between questions to IMDS: EC2's notice comes about 2 minutes ahead


def log(root: Path, message: str) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    fd = os.open(root / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE)
    if os.fstat(fd).st_mode & 0o077:  # an older orch's, readable by others
        os.fchmod(fd, PRIVATE)
    with open(fd, "a") as fh:
        fh.write(f"{stamp} {message}\n")


def arm(root: Path, idle_minutes: float, command: str, code: Path) -> Autostop:
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / SETTING, {"idle_minutes": idle_minutes, "command": command, "armed_at": time.time()},
                      mode=PRIVATE)
    if read_json(root / STATE).get("error"):  # a new setting: the old command's failure is history
        _write_state(root, {"error": None})
    log(root, f"armed: run {command!r} after {idle_minutes:g} idle minutes")
    if not is_locked(root / LOCK):
        _start(root, code)
    return autostop(root)


def disarm(root: Path) -> Autostop:
    if (root / SETTING).exists():
        (root / SETTING).unlink()
        log(root, "disarmed")
    return autostop(root)


def watch_spot(root: Path, metadata_url: str, code: Path) -> None:
    """Spot watching on (a launch on a spot instance): the setting, and a watcher running."""
    root.mkdir(parents=True, exist_ok=True)
    if read_json(root / SPOT).get("metadata_url") != metadata_url:
        log(root, f"spot: watching {metadata_url} (IMDSv2) for interruption notices every {SPOT_POLL:g} s")
    atomic_write_json(root / SPOT, {"metadata_url": metadata_url, "armed_at": time.time()}, mode=PRIVATE)
    if not is_locked(root / LOCK):
        _start(root, code)


def _start(root: Path, code: Path) -> None:
    """The watcher, detached: its own session, no terminal, no SSH channel held open; from the
    uploaded code version ``code`` (`-m` looks in the working folder first; -S: the standard
    library is all it needs)."""
    with open(os.devnull, "rb") as devnull, open(root / LOG, "ab") as out:
        subprocess.Popen([sys.executable, "-S", "-m", "trainer.machine", NO_FRAME, WATCH.name, str(root)],
                         stdin=devnull, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=code)
    deadline = time.monotonic() + 10
    while not is_locked(root / LOCK) and time.monotonic() < deadline:
        time.sleep(0.05)  # `status` right after `arm` should find it running


def busy(root: Path, uid: int | None = None) -> str | None:
    """Why the machine is not idle (an active run, a launch, orch at work), or None. A lock held
    only by processes of another user is no sign of orch at work: it is ignored, and logged."""
    for name, shared in ((layout.ACTIVITY_LOCK, True), (layout.LAUNCH_LOCK, False)):
        held_by = _holders_text(foreign_holders(root / name, uid))
        if tighten(root / name):  # an older orch's 0644 lock, perhaps held by another user: replaced
            _note_once(root, f"replaced {name} by a 0600 one (others could open it; held by {held_by or 'no one'})")
        if not is_locked(root / name, shared_too=shared):
            continue
        held_by = _holders_text(foreign_holders(root / name, uid))
        if not held_by:
            return "orch is at work on the machine"
        _note_once(root, f"ignoring {name}: held by {held_by}, another user's, not orch's")
    # A trainer's process is work on the machine until it exits, final state or not: after
    # writing `finished` it still uploads that state to storage (up to mirror.FINAL_WAIT), and a
    # shutdown then would lose it.
    alive = [r for r in list_runs(root) if r.alive]
    running = [r.run_id for r in alive if r.active]
    ending = [r.run_id for r in alive if not r.active]
    why = [f"run {', '.join(running)} is active"] if running else []
    why += [f"run {', '.join(ending)} is ending (its trainer has not exited yet)"] if ending else []
    return "; ".join(why) or None


def _holders_text(holders: list[tuple[int, int]]) -> str:
    return ", ".join(f"pid {p} (uid {u})" for p, u in holders)


_noted: set[str] = set()


def _note_once(root: Path, message: str) -> None:
    if message not in _noted:
        if len(_noted) > 100:
            _noted.clear()
        _noted.add(message)
        _log_quietly(root, message)


def watch(root: Path) -> int:
    """The watcher's loop: look, decide, log; run the command once when idle long enough; ask
    IMDS every 5 s while spot watching is set. Nothing it meets (a full disk, a bad setting, a
    failing command, a silent metadata service) ends it while either is set."""
    held = open_lock(root / LOCK)
    if not try_lock(held):  # the descriptor stays open: the lock is held for life
        os.close(held)
        return 0  # one watcher per remote.root: it will see the new setting
    _log_quietly(root, f"watcher started (pid {os.getpid()})")
    clock, spot = _Clock(), _SpotWatch()
    while True:
        try:
            setting, spot_setting = read_json(root / SETTING), read_json(root / SPOT)
            if not setting and not spot_setting and _let_go(root, held):
                _log_quietly(root, "no autostop or spot setting: the watcher exits")
                return 0
            pauses = [clock.step(root, setting)] if setting else []
            if spot_setting:
                pauses.append(spot.step(root, spot_setting))
            pause = min(pauses)
        except Exception as exc:  # e.g. ENOSPC writing watcher.json: look again later, never die
            _log_quietly(root, f"watcher: {type(exc).__name__}: {exc}")
            pause = 5.0
        time.sleep(pause)


def _let_go(root: Path, held: int) -> bool:
    """Whether the watcher may exit: nothing is set, as seen under the launch lock (a launch sets
    autostop and spot watching under it, and starts a watcher only when none holds watcher.lock):
    watcher.lock is let go before the launch lock, so no launch can find it held by a watcher on
    its way out. False: a setting came meanwhile, the watcher goes on."""
    try:
        launching = lock(root / layout.LAUNCH_LOCK, wait=30.0)
    except OSError:  # remote.root itself is gone (or unwritable): nothing to watch there any more
        launching = None
    try:
        if read_json(root / SETTING) or read_json(root / SPOT):
            return False
        os.close(held)
        return True
    finally:
        if launching is not None:
            os.close(launching)


class _Clock:
    """The idle clock: reset by any activity and by each new arming (a deploy)."""

    def __init__(self) -> None:
        self.idle_since: float | None = None
        self.retry_at: float | None = None  # after a failed command: try again one idle period later

    def step(self, root: Path, setting: dict[str, Any]) -> float:
        now = time.time()
        idle = float(setting["idle_minutes"]) * 60
        if busy(root):
            self.idle_since = self.retry_at = None
        else:
            self.idle_since = max(self.idle_since or now, float(setting.get("armed_at", now)))
        stops_at = None if self.idle_since is None else max(self.idle_since + idle, self.retry_at or 0)
        _write_state(root, {"pid": os.getpid(), "checked_at": now, "idle_since": self.idle_since,
                            "stops_at": stops_at, "fired_at": None})
        if stops_at is not None and now >= stops_at:
            if _fire(root, setting, self.idle_since or now):
                if not (root / SPOT).exists():
                    raise SystemExit(0)
                self.idle_since = self.retry_at = None  # done until the next arming; spot watching goes on
                return 0.0
            self.retry_at = time.time() + idle
        return min(30.0, max(0.2, idle / 20))


class _SpotWatch:
    """Spot notices: IMDS asked every SPOT_POLL seconds; each notice acted on once per run."""

    def __init__(self) -> None:
        self.imds: Imds | None = None
        self.next_at = 0.0  # time.monotonic() of the next question
        self.done: set[tuple[str, int | None, str]] = set()  # (run, pid, notice) acted on

    def step(self, root: Path, setting: dict[str, Any]) -> float:
        """Ask if it is time to; seconds until the next question."""
        now = time.monotonic()
        if now < self.next_at:
            return self.next_at - now
        self.next_at = now + SPOT_POLL
        url = setting.get("metadata_url")
        try:
            if not isinstance(url, str):
                raise ImdsError(f"{SPOT} names no metadata_url")
            if self.imds is None or self.imds.url != url.rstrip("/"):
                self.imds = Imds(url)
            notice = self.imds.instance_action()
            if notice is not None:
                interrupt(root, notice, self.done)
            self._rebalance(root, self.imds)
        except ImdsError as exc:  # the service is silent or odd now: said once, asked again in 5 s
            _note_once(root, f"spot: the metadata service does not answer as IMDSv2 does: {exc}")
        return max(0.0, self.next_at - time.monotonic())

    def _rebalance(self, root: Path, imds: Imds) -> None:
        """EC2's rebalance recommendation: recorded (watcher.json) and logged once per
        recommendation, nothing more; forgotten when IMDS has none again (a restarted instance)."""
        at, recorded = imds.rebalance(), read_json(root / STATE).get("rebalance_at")
        if at == recorded:
            return
        _write_state(root, {"rebalance_at": at})
        if at is not None:
            _log_quietly(root, f"spot: EC2 recommends rebalancing since {at}: this instance is at higher risk of "
                               "interruption (nothing is done about it)")


def interrupt(root: Path, notice: Interruption, done: set[tuple[str, int | None, str]] | None = None) -> list[str]:
    """For every active run under ``root``: ``interruption.json`` (atomically), then SIGTERM to its
    trainer (pid and start time checked) so that it commits, uploads and ends ``interrupted``.
    Once per notice per run: a run whose interruption.json already holds this notice (or, where
    it could not be written, that ``done`` remembers) is left alone. Returns the runs signalled."""
    from trainer.machine.launch import stop_run  # launch imports this module

    done = set() if done is None else done
    key = f"{notice.action} at {notice.notice_time}"
    signalled = []
    for run in list_runs(root):
        run_dir = root / layout.RUNS_DIR / run.run_id
        seen = read_json(run_dir / layout.INTERRUPTION)
        if not run.active or (run.run_id, run.pid, key) in done or \
                (seen.get("action"), seen.get("notice_time")) == (notice.action, notice.notice_time):
            continue
        done.add((run.run_id, run.pid, key))
        try:
            atomic_write_json(run_dir / layout.INTERRUPTION, notice.to_json())
        except OSError as exc:  # a full disk: the trainer still gets its signal (it ends `stopped`)
            _log_quietly(root, f"spot: cannot write {layout.INTERRUPTION} of run {run.run_id}: {exc}")
        sent = stop_run(run_dir)
        what = f"sent SIGTERM (pid {sent.pid}) to commit and stop" if sent.sent else f"not signalled: {sent.message}"
        _log_quietly(root, f"spot: EC2 gave notice ({key}): run {run.run_id} {what}")
        signalled.append(run.run_id)
    return signalled


def _fire(root: Path, setting: dict[str, Any], idle_since: float) -> bool:
    """Run the command; True when it succeeded (autostop is then done until the next arming)."""
    command = str(setting["command"])
    log(root, f"no run active for {(time.time() - idle_since) / 60:.1f} min: running {command!r}")
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()[-300:]
    log(root, f"{command!r} exited {done.returncode} {output}")
    if done.returncode != 0:  # stays armed: `orch status` shows the failure, it is tried again later
        _write_state(root, {"error": f"{command!r} exited {done.returncode}: {output or 'no output'}"})
        return False
    (root / SETTING).unlink(missing_ok=True)  # once: a later deploy arms it again
    _write_state(root, {"fired_at": time.time(), "stops_at": None, "error": None})
    return True


def _write_state(root: Path, fields: dict[str, Any]) -> None:
    """Update watcher.json; on a full disk the watcher goes on deciding without it."""
    with contextlib.suppress(OSError):
        atomic_write_json(root / STATE, {**read_json(root / STATE), **fields}, mode=PRIVATE)


def _log_quietly(root: Path, message: str) -> None:
    with contextlib.suppress(OSError):
        log(root, message)


def wake(root: Path, code: Path) -> Autostop:
    """Start the watcher again if autostop is armed or spot watching set, and none runs (after a
    reboot: `orch up`)."""
    if ((root / SETTING).exists() or (root / SPOT).exists()) and not is_locked(root / LOCK):
        log(root, "woken (the machine was started again)")
        _start(root, code)
    return autostop(root)


def run(verb: str, argv: list[str], out: Any) -> int:
    if verb == WATCH.name:
        return watch(Path(argv[0]))
    parser = argparse.ArgumentParser(prog="python3 -m trainer.machine FRAME autostop")
    parser.add_argument("root", type=Path)
    parser.add_argument("action", choices=("arm", "disarm", "status", "wake"))
    parser.add_argument("--idle-minutes", type=float)
    parser.add_argument("--command")
    parser.add_argument("--code", type=Path, help="the uploaded code version a watcher is started from")
    args = parser.parse_args(argv)
    if args.action in ("arm", "wake") and args.code is None:
        parser.error(f"{args.action} needs --code")
    if args.action == "arm":
        if args.idle_minutes is None or args.command is None:
            parser.error("arm needs --idle-minutes and --command")
        out.answer(arm(args.root, args.idle_minutes, args.command, args.code))
    else:
        out.answer({"disarm": disarm, "status": autostop, "wake": lambda r: wake(r, args.code)}[args.action](args.root))
    return 0
