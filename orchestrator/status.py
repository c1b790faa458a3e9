"""`orch status`, `orch up` and `orch down`: the machine as it is (instance, cost, GPUs, runs,
autostop), starting it, and stopping it without surprises. Only `up` ever starts an instance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.autostop import wake
from orchestrator.context import Context
from orchestrator.errors import BusyError, OrchError
from orchestrator.provision import InstanceStatus, acquire, provider
from trainer.contract import verbs
from trainer.contract.wire import MachineReport


@dataclass(frozen=True)
class MachineStatus:
    target: str
    instance: InstanceStatus | None
    host: str | None  # None: the instance is not running, nothing was asked of it
    machine: MachineReport | None

    @property
    def stopped(self) -> bool:
        return self.instance is not None and not self.instance.running

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def machine_status(ctx: Context) -> MachineStatus:
    """The instance (type, state, price, uptime, cost so far), then, if it runs, ONE question
    to the machine: GPUs, load, runs, autostop."""
    instance = provider(ctx).status()
    if instance is not None and not instance.running:
        return MachineStatus(ctx.cfg.target, instance, None, None)
    with acquire(ctx) as m:
        return MachineStatus(ctx.cfg.target, instance, m.remote.host, m.answer(verbs.MACHINE, m.root))


def up(ctx: Context) -> InstanceStatus:
    """Start the instance; then, as a reboot loses the autostop watcher (not its setting),
    start the watcher again if autostop is armed."""
    inst = provider(ctx).start()
    try:
        with acquire(ctx) as m:
            wake(m)
    except OrchError as exc:
        ctx.log(f"could not check autostop on the machine ({exc}); the next deploy arms it again")
    return inst


def down(ctx: Context, *, force: bool = False, confirm: Callable[[str], bool] | None = None) -> InstanceStatus | None:
    """Stop the instance; refuse while a run is active unless ``force``. ``confirm`` (a
    terminal's yes/no) may decline: None is returned and the instance keeps running."""
    p = provider(ctx)
    inst = p.status()
    if inst is None:
        return p.stop()  # the provider says why it cannot
    if inst.running and not force:
        with acquire(ctx) as m:
            active = [r.run_id for r in m.runs() if r.active]
        if active:
            raise BusyError(f"run {', '.join(active)} is still running on {inst.id}: `orch stop` it first, "
                            "or pass --force to stop the instance anyway (the run dies; `orch resume RUN --continue` "
                            "picks it up later)")
    if inst.running and confirm is not None and not confirm(
            f"Stop instance {inst.id} ({inst.type})? Its disk, runs and data stay."):
        return None
    return p.stop()
