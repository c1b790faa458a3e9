"""The companions of deploy and monitor: ``orch runs``, ``logs``, ``stop``."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from orchestrator.context import Context
from orchestrator.errors import AwsError, ConfigError, RemoteError
from orchestrator.machine import Machine
from orchestrator.provision import acquire
from orchestrator.storage import Storage, machine_or_storage, storage
from orchestrator.terminal import clean
from trainer.contract import layout, verbs
from trainer.contract.wire import BOTH, ON_MACHINE, RunInfo, accuracy_text

STOP_TIMEOUT = 120.0
UPLOAD_TIMEOUT = 330.0  # a stopped trainer waits up to 300 s (trainer/ml/mirror.FINAL_WAIT) for S3


def duration_seconds(run: RunInfo) -> float | None:
    """From the run's start to its last status update."""
    try:
        return (datetime.fromisoformat(run.updated_at) - datetime.fromisoformat(run.started_at)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def run_json(run: RunInfo) -> dict[str, Any]:
    """A run as `--json` shows it: the record, the state users see, the duration, how often it
    was recovered and the seconds that cost."""
    return run.to_json() | {"state": run.shown_state, "seconds": duration_seconds(run),
                            "recovered": len(run.recoveries), "lost_seconds": run.lost_seconds}


def lost_time(seconds: float) -> str:
    """'40 s', '3 min', '2.5 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def recovered(run: RunInfo, *, noun: bool = True) -> str:
    """'2 recoveries, 3 min lost' (noun) or 'recovered 2 times, 3 min lost'; '' without any."""
    n = len(run.recoveries)
    if not n:
        return ""
    text = (f"{n} recover{'y' if n == 1 else 'ies'}" if noun else
            f"recovered {'once' if n == 1 else f'{n} times'}")
    lost = run.lost_seconds
    return text + (f", {lost_time(lost)} lost" if lost is not None else "")


def list_runs(ctx: Context) -> list[RunInfo]:
    """Every run on the machine and in the storage mirror, oldest first, each saying where it
    lives (the machine's only when it cannot be reached)."""
    store = storage(ctx.cfg)
    on_machine = machine_or_storage(ctx, lambda m: m.runs(), lambda _store: None)
    if store is None:
        assert on_machine is not None
        return on_machine
    try:  # a run the machine lists is read there: only the others cost reads of the bucket
        stored = {r.run_id: r for r in store.runs(skip=frozenset(r.run_id for r in on_machine or []))}
    except AwsError as exc:
        if on_machine is None:
            raise
        ctx.log(f"storage cannot be read ({exc}); these are the machine's runs only")
        return on_machine
    mine = {r.run_id for r in on_machine or []}
    return [r for rid, r in sorted(stored.items()) if rid not in mine] + \
        [replace(r, where=BOTH) if r.run_id in stored else r for r in on_machine or []]


def compared_with_parent(run: RunInfo, *, long: bool = False) -> str:
    """How an extended run compares with its parent: '+0.0123 (beat it)'; long: 'parent P
    best 0.6100: +0.0123, beat it'. '' without a parent."""
    if not run.parent:
        return ""
    verdict = "beat it" if run.beat_parent else "did not beat it (its best is still the parent's weights)" if long \
        else "did not beat it"
    if run.vs_parent is None:
        return f"parent {run.parent}: no comparison yet" if long else "-"
    if not long:
        return f"{run.vs_parent:+.4f} ({verdict})"
    base = f" best {accuracy_text(run.parent_best_val_accuracy)}" if run.parent_best_val_accuracy is not None else ""
    return f"parent {run.parent}{base}: {run.vs_parent:+.4f}, {verdict}"


def runs_table(runs: list[RunInfo]) -> Any:
    """The `orch runs` table. The run column never shrinks (ids are what users copy); the
    others wrap when the terminal is narrow."""
    from rich.table import Column, Table

    width = max(len(r.run_id) for r in runs)
    mirrored = any(r.where != ON_MACHINE for r in runs)  # a storage mirror is set: say where each run lives
    recoveries = any(r.recoveries for r in runs)
    table = Table(Column("run", no_wrap=True, min_width=width, overflow="fold"),
                  *(Column(name, overflow="fold") for name in
                    ("parent", "state", "epoch", "best val acc", "vs parent", "started", "duration")),
                  *([Column("where")] if mirrored else []), *([Column("recovered")] if recoveries else []))
    for r in runs:
        seconds = duration_seconds(r)
        cells = (r.run_id, r.parent or "", str(r.shown_state), f"{r.epoch}/{r.epochs}",
                 accuracy_text(r.best_val_accuracy),
                 compared_with_parent(r), (r.started_at or "")[:19].replace("T", " "),
                 f"{seconds / 60:.1f} min" if seconds is not None else "", *([r.where] if mirrored else []),
                 *([recovered(r)] if recoveries else []))
        table.add_row(*map(clean, cells))
    return table


def logs(ctx: Context, run_id: str | None, *, follow: bool, write: Callable[[str], None]) -> str:
    """Print train.log (default: the latest run); ``follow`` keeps printing until the run ends.
    ONE command streams it (trainer/machine/logstream.py): the transport's speed, flat memory."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")  # keeps a character cut in two

    def text(chunk: bytes) -> None:
        if out := decode.decode(chunk):
            write(out)

    def from_machine(m: Machine) -> str:
        chosen = m.choose(run_id).run_id
        m.stream(verbs.LOG, m.run_dir(chosen), 0, *(["--follow"] if follow else []), sink=text)
        return chosen

    def from_storage(store: Storage) -> str:
        chosen = store.choose(run_id).run_id
        if follow:
            ctx.log(f"run {chosen}: showing the log as last mirrored to {store.uri} (it cannot be followed there)")
        store.stream(chosen, layout.TRAIN_LOG, text)
        return chosen

    chosen = machine_or_storage(ctx, from_machine, from_storage)
    write(decode.decode(b"", final=True))
    return chosen


def stop(ctx: Context, run_id: str | None, *, timeout: float = STOP_TIMEOUT) -> RunInfo:
    """SIGTERM the run's process (default: the running one), wait for its final state."""
    with acquire(ctx) as m:
        run = _running(m, run_id)
        # The machine checks pid and start time again before it signals: never a reused pid.
        sent = m.answer(verbs.SIGNAL, m.run_dir(run.run_id))
        if not sent.sent:
            raise ConfigError(f"run {run.run_id}: {sent.message}")
        ctx.log(f"sent SIGTERM to run {run.run_id} (pid {sent.pid}); waiting for it to save and stop")
        deadline, saved = time.monotonic() + timeout, False
        while time.monotonic() < deadline:
            now = m.choose(run.run_id)
            if not now.alive:
                return now
            if now.final and now.mirror is not None and not saved:  # saved and stopped: its final upload is left
                saved, deadline = True, time.monotonic() + UPLOAD_TIMEOUT
                ctx.log(f"run {run.run_id} is {now.shown_state}; waiting for its final upload to storage")
            time.sleep(1.0)
        if saved:
            return now
    raise RemoteError(f"run {run.run_id} did not stop within {timeout:.0f} s; it is still running")


def _running(m: Machine, run_id: str | None) -> RunInfo:
    if run_id is not None:
        run = m.choose(run_id)
        if not run.alive:
            raise ConfigError(f"run {run.run_id} is not running (state {run.shown_state})")
        return run
    active = [r for r in m.runs() if r.alive]
    if not active:
        raise ConfigError(f"no run is running on {m.remote.host}")
    if len(active) > 1:
        raise ConfigError(f"{len(active)} runs are running ({', '.join(r.run_id for r in active)}); name one")
    return active[0]
