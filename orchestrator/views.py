"""How records look on a terminal, for the commands that print more than a line (the CLI
renders with these; `orch monitor`'s live view is orchestrator/monitor.py's RunView)."""

from __future__ import annotations

from orchestrator.status import MachineStatus
from trainer.contract.wire import accuracy_text


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
