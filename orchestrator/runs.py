"""The companions of deploy and monitor: ``orch runs``, ``status``, ``logs``, ``stop``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError, RemoteError
from orchestrator.machine import Machine, connect
from orchestrator.remote import q
from trainer import layout
from trainer.wire import RunInfo

Log = Callable[[str], None]
STOP_TIMEOUT = 120.0


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def list_runs(cfg: DeployConfig, *, trust_new_host: bool = False, log: Log = lambda _m: None) -> list[dict[str, Any]]:
    """Every run on the machine, oldest first, with ``state`` as users see it and a duration."""
    with connect(cfg, trust_new_host=trust_new_host, log=log) as m:
        runs = m.runs()
    return [r.to_json() | {"state": r.shown_state, "seconds": _seconds_between(r.started_at, r.updated_at)}
            for r in runs]


def compared_with_parent(run: Mapping[str, Any], *, long: bool = False) -> str:
    """How an extended run compares with its parent, from status.json's (or RunInfo's) fields:
    '+0.0123 (beat it)'; long: 'parent first best 0.6100: +0.0123, beat it'. '' without a parent."""
    parent = run.get("parent")
    if not parent:
        return ""
    delta, beat, base = run.get("vs_parent"), run.get("beat_parent"), run.get("parent_best_val_accuracy")
    verdict = "beat it" if beat else "did not beat it (its best is still the parent's weights)" if long \
        else "did not beat it"
    if delta is None:
        return f"parent {parent}: no comparison yet" if long else "-"
    if not long:
        return f"{delta:+.4f} ({verdict})"
    base_text = f" best {base:.4f}" if base is not None else ""
    return f"parent {parent}{base_text}: {delta:+.4f}, {verdict}"


def runs_table(runs: list[dict[str, Any]]) -> Any:
    """The `orch runs` table. The run column never shrinks (ids are what users copy); the
    others wrap when the terminal is narrow."""
    from rich.table import Column, Table

    width = max(len(r["run_id"]) for r in runs)
    table = Table(Column("run", no_wrap=True, min_width=width, overflow="fold"),
                  *(Column(name, overflow="fold") for name in
                    ("parent", "state", "epoch", "best val acc", "vs parent", "started", "duration")))
    for r in runs:
        best = r.get("best_val_accuracy")
        table.add_row(r["run_id"], r.get("parent") or "", str(r["state"]), f"{r.get('epoch')}/{r.get('epochs')}",
                      f"{best:.4f}" if best is not None else "-", compared_with_parent(r),
                      (r.get("started_at") or "")[:19].replace("T", " "),
                      f"{r['seconds'] / 60:.1f} min" if r.get("seconds") is not None else "")
    return table


def logs(cfg: DeployConfig, run_id: str | None, *, follow: bool, write: Callable[[str], None],
         interval: float = 1.0, trust_new_host: bool = False, log: Log = lambda _m: None) -> str:
    """Print train.log (default: the latest run); ``follow`` keeps printing until the run ends."""
    with connect(cfg, trust_new_host=trust_new_host, log=log) as m:
        run_id = m.choose(run_id).run_id
        path = f"{m.run_dir(run_id)}/{layout.TRAIN_LOG}"
        offset = 0
        while True:
            chunk = m.remote.run(f"tail -c +{offset + 1} {q(path)} 2>/dev/null", check=False).stdout
            if chunk:
                write(chunk)
                offset += len(chunk.encode())
            if not follow:
                return run_id
            if not m.choose(run_id).active:
                rest = m.remote.run(f"tail -c +{offset + 1} {q(path)} 2>/dev/null", check=False).stdout
                if rest:
                    write(rest)
                return run_id
            time.sleep(interval)


def stop(cfg: DeployConfig, run_id: str | None, *, timeout: float = STOP_TIMEOUT, trust_new_host: bool = False,
         log: Log = lambda _m: None) -> dict[str, Any]:
    """SIGTERM the run's process (default: the running one), wait for its final state."""
    with connect(cfg, trust_new_host=trust_new_host, log=log) as m:
        run = _running(m, run_id)
        # The probe just matched pid and start time: this pid is the trainer, not a reused one.
        m.remote.run(f"kill -TERM {int(run.pid or 0)}", what="stopping the run")
        log(f"sent SIGTERM to run {run.run_id} (pid {run.pid}); waiting for it to save and stop")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = m.choose(run.run_id)
            if not now.alive:
                return now.to_json() | {"state": now.shown_state}
            time.sleep(1.0)
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
