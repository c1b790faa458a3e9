"""The companions of deploy and monitor: ``orch runs``, ``logs``, ``stop``, ``rm``."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from orchestrator import completion
from orchestrator.context import Context
from orchestrator.errors import AwsError, BusyError, ConfigError, NoSuchRun, RemoteError
from orchestrator.machine import Machine, find_run
from orchestrator.provision import acquire
from orchestrator.status import Consent
from orchestrator.storage import CANNOT_ANSWER, Storage, machine_or_storage, storage
from orchestrator.terminal import clean
from trainer.contract import layout, verbs
from trainer.contract.wire import BOTH, IN_STORAGE, ON_MACHINE, RunInfo, accuracy_text

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


def started(run: RunInfo) -> float:
    """When the run began (seconds since the epoch): its folder's creation on the machine, else
    run.json's start (a run only the storage mirror holds); 0 when neither says."""
    if run.created is not None:
        return run.created
    try:
        return datetime.fromisoformat(run.started_at).timestamp()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def newest_first(runs: Sequence[RunInfo], limit: int | None = None) -> list[RunInfo]:
    """The runs, newest first (the ``limit`` newest)."""
    ordered = sorted(runs, key=lambda r: (started(r), r.run_id), reverse=True)
    return ordered[:limit] if limit is not None else ordered


def list_runs(ctx: Context, limit: int | None = None) -> list[RunInfo]:
    """Every run on the machine and in the storage mirror, newest first (the ``limit`` newest),
    each saying where it lives (the machine's only when it cannot be reached). The ids are
    cached for the shell's completion (orchestrator/completion.py)."""
    runs = newest_first(_all_runs(ctx))
    completion.remember(ctx.cfg, [r.run_id for r in runs])
    return runs[:limit] if limit is not None else runs


def _all_runs(ctx: Context) -> list[RunInfo]:
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


def stop(ctx: Context, run_ids: Sequence[str] = (), *, every: bool = False,
         timeout: float = STOP_TIMEOUT) -> list[RunInfo]:
    """SIGTERM the runs' processes (none named: the running one; ``every``: all that run), then
    wait for their final states, all together; the runs as they ended ([]: ``every`` found none)."""
    with acquire(ctx) as m:
        targets = _running(m, run_ids, every)
        for run in targets:
            # The machine checks pid and start time again before it signals: never a reused pid.
            sent = m.answer(verbs.SIGNAL, m.run_dir(run.run_id))
            if not sent.sent:
                raise ConfigError(f"run {run.run_id}: {sent.message}")
            ctx.log(f"sent SIGTERM to run {run.run_id} (pid {sent.pid}); waiting for it to save and stop")
        deadline = {r.run_id: time.monotonic() + timeout for r in targets}
        ended: dict[str, RunInfo] = {}
        saved: set[str] = set()
        while len(ended) < len(targets):
            now = {r.run_id: r for r in m.runs()}
            for run_id in deadline.keys() - ended.keys():
                run = now.get(run_id)
                if run is None or not run.alive:
                    ended[run_id] = run or RunInfo(run_id)
                elif run.final and run.mirror is not None and run_id not in saved:  # its final upload is left
                    saved.add(run_id)
                    deadline[run_id] = time.monotonic() + UPLOAD_TIMEOUT
                    ctx.log(f"run {run_id} is {run.shown_state}; waiting for its final upload to storage")
                elif time.monotonic() > deadline[run_id]:
                    if run_id not in saved:
                        raise RemoteError(f"run {run_id} did not stop within {timeout:.0f} s; it is still running")
                    ended[run_id] = run
            if len(ended) < len(targets):
                time.sleep(1.0)
    return [ended[r.run_id] for r in targets]


def _running(m: Machine, run_ids: Sequence[str], every: bool) -> list[RunInfo]:
    runs = m.runs()
    if every:
        return [r for r in runs if r.alive]
    if run_ids:
        chosen = list({r.run_id: r for r in (find_run(runs, given, m.remote.host) for given in run_ids)}.values())
        idle = [r for r in chosen if not r.alive]
        if idle:
            raise ConfigError(f"run {idle[0].run_id} is not running (state {idle[0].shown_state}); nothing was stopped")
        return chosen
    active = [r for r in runs if r.alive]
    if not active:
        raise ConfigError(f"no run is running on {m.remote.host}")
    if len(active) > 1:
        raise ConfigError(f"{len(active)} runs are running ({', '.join(r.run_id for r in active)}); name them, or "
                          "pass --all")
    return active


@dataclass(frozen=True)
class Removal:
    """What `orch rm` removed: run folders on the machine, and runs' storage mirrors."""

    host: str | None  # None: the machine could not be reached (only storage was asked)
    removed: list[str] = field(default_factory=list)  # from the machine
    mirrors: dict[str, int] = field(default_factory=dict)  # run id -> objects removed from storage

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "removed": self.removed, "storage": self.mirrors}


def remove(ctx: Context, run_ids: Sequence[str], *, with_storage: bool = False,
           consent: Consent = Consent()) -> Removal | None:
    """Delete runs (ids or unique prefixes) from the machine and, ``with_storage``, their
    mirrors. Refuses an active run (BusyError) and anything that is not a run id, before
    removing anything; asks first (``consent``). None: the question was declined."""
    bad = [r for r in run_ids if not layout.is_run_id(r)]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not a run id (letters, digits, '.', '_' and '-'; never a path); nothing "
                          "was removed")
    store = storage(ctx.cfg) if with_storage else None
    if with_storage and store is None:
        raise ConfigError("--storage: deploy.yaml has no storage: section, so runs have no mirror to remove")
    if not consent.yes and consent.ask is None:
        raise ConfigError("orch rm deletes runs: it asks first on a terminal; without one, pass -y")
    try:
        with acquire(ctx) as m:
            return _remove(ctx, m, run_ids, store, consent)
    except CANNOT_ANSWER as exc:
        if store is None:
            raise
        ctx.log(f"the machine cannot be reached ({exc}); removing from {store.uri} only")
        return _remove(ctx, None, run_ids, store, consent)


def _remove(ctx: Context, m: Machine | None, run_ids: Sequence[str], store: Storage | None,
            consent: Consent) -> Removal | None:
    runs = m.runs() if m is not None else []
    stored = [RunInfo(i, where=IN_STORAGE) for i in store.run_ids()] if store is not None else []
    chosen: dict[str, RunInfo] = {}
    for given in run_ids:
        try:
            run = find_run(runs, given, m.remote.host if m is not None else "the machine")
        except NoSuchRun:
            if store is None:
                raise
            run = find_run(stored, given, f"{m.remote.host if m is not None else 'the machine'} or {store.uri}")
        chosen[run.run_id] = run
    active = [r for r in chosen.values() if r.alive]
    if active:
        raise BusyError(f"run {active[0].run_id} is active (pid {active[0].pid}): `orch stop {active[0].run_id}` "
                        "first; nothing was removed")
    here = [r for r in chosen if r in {x.run_id for x in runs}]
    mirrored = [r for r in chosen if r in {x.run_id for x in stored}]
    places = " and ".join([*([m.remote.host] if here and m is not None else []),
                           *([store.uri] if mirrored and store is not None else [])])
    question = (f"Remove run{'s' if len(chosen) > 1 else ''} {', '.join(chosen)} from {places}? Checkpoints, "
                "metrics and logs are deleted" + ("" if store is not None else " (a storage mirror is kept: "
                                                  "--storage removes it too)") + ".")
    if not consent.yes and consent.ask is not None and not consent.ask(question):
        return None
    removal = Removal(m.remote.host if m is not None else None)
    if here and m is not None:
        got = m.answer(verbs.REMOVE, m.root, *here)
        removal.removed.extend(got.removed)
        completion.forget(ctx.cfg, got.removed)
        if got.refused:
            run_id, why = next(iter(got.refused.items()))
            raise BusyError(f"run {run_id} was not removed from {m.remote.host}: {why}"
                            + (f" (removed: {', '.join(got.removed)})" if got.removed else ""))
    for run_id in mirrored:
        assert store is not None
        removal.mirrors[run_id] = store.remove(run_id)
    return removal
