"""How records look on a terminal, for the commands that print more than a line (the CLI
renders with these; `orch monitor`'s live view is orchestrator/monitor.py's RunView)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.status import MachineStatus
from trainer.contract.wire import accuracy_text

if TYPE_CHECKING:
    from orchestrator.sweep import SweepStatus


def status_lines(st: MachineStatus) -> list[str]:
    """`orch status`: the instance and its cost, the host's GPUs (or load), the runs, autostop."""
    from orchestrator.autostop import describe
    from orchestrator.monitor import describe_load

    lines = []
    if st.instance is not None:
        i = st.instance
        lines += [f"instance {i.id} ({i.type}, {i.market}): {i.state}, address {i.address or '-'}",
                  f"  cost: {i.cost.describe()}"]
    if st.unreachable:
        lines.append(f"machine: unreachable: {st.unreachable}")
    if st.machine is None:
        return lines
    lines.append(f"host {st.host}")
    for g in st.machine.host.gpus:
        lines.append(f"  GPU {g.index} {g.name}: {g.utilization}% util, {g.memory_used}/{g.memory_total} MiB, "
                     f"{g.temperature} °C, {g.power} W")
    if not st.machine.host.gpus:
        lines.append(f"  {describe_load(st.machine.host)}")
    active = [r for r in st.machine.runs if r.active]
    lines += [f"  running: {r.run_id} epoch {r.epoch}/{r.epochs}, "
              + (f"best {accuracy_text(r.best_val_accuracy)}" if r.best_val_accuracy is not None else
                 "no epoch finished yet")
              + (f"; STALLED: {r.stall}" if r.stall else "") for r in active]
    if not active:
        lines.append("  no run is running")
    lines.append(f"  {describe(st.machine.autostop)}")
    return lines


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def sweep_table(st: SweepStatus) -> Any:
    """`orch sweep status`: one row per trial; run ids are never cut (they are what users copy)."""
    from rich.table import Column, Table

    from orchestrator.terminal import clean

    table = Table(Column("trial", justify="right"), Column("state"), Column(st.objective),
                  Column("run", no_wrap=True, overflow="fold"), Column("minutes"),
                  Column("parameters", overflow="fold"), Column("ended", overflow="fold"))
    for t in st.trials:
        params = ", ".join(f"{k}={_value(v)}" for k, v in t.params.items())
        cells = (str(t.number), t.state, "" if t.value is None else f"{t.value:.4f}", t.run_id or "",
                 "" if t.seconds is None else f"{t.seconds / 60:.1f}", params, t.ended or "")
        table.add_row(*map(clean, cells))
    return table


def sweep_lines(st: SweepStatus) -> list[str]:
    """The lines under the table: the best trial and its run, what the trials took (and cost)."""
    states = [t.state for t in st.trials]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(states))
    lines = [f"sweep {st.name}: {len(st.trials)} of {st.planned} trials" + (f" ({counts})" if counts else "")
             + f"; {st.direction} {st.objective}; study in {st.storage}"]
    if st.best is not None:
        lines.append(f"best: trial {st.best.number}, {st.objective} {st.best.value:.4f}, run {st.best.run_id} "
                     f"(`orch download {st.best.run_id}`)")
    cost = f", about ${st.usd:.2f} at ${st.hourly_usd:.3f}/hour" if st.usd is not None else ""
    lines.append(f"trials took {st.hours:.3f} instance-hours{cost}")
    if st.stopped is not None:
        lines.append(f"stopped launching: {st.stopped}")
    return lines
