"""`orch status`, `orch up` and `orch down`: the machine as it is (instance, cost, GPUs, runs,
autostop), starting (or creating) it, and stopping or terminating it without surprises. Only
`up` (and the launching commands) ever start or create an instance. What EC2 says is shown even
when the machine cannot be reached, and stopping never depends on reaching it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from orchestrator.autostop import wake
from orchestrator.context import Context
from orchestrator.errors import AwsError, BusyError, ConfigError, ConnectError, HostKeyError, OrchError, RemoteError
from orchestrator.provision import InstanceStatus, acquire, bring_up, provider, quick_reach
from orchestrator.storage import storage
from trainer.contract import verbs
from trainer.contract.wire import MachineReport, RunInfo

# What keeps a command from asking the machine: it is shown as unreachable, not an error of its own.
UNREACHABLE = (ConnectError, HostKeyError)


@dataclass(frozen=True)
class MachineStatus:
    target: str
    instance: InstanceStatus | None
    host: str | None  # None: the instance is not running, nothing was asked of it
    machine: MachineReport | None
    unreachable: str | None = None  # why the machine could not be asked (what EC2 says is still shown)
    unreachable_code: int = 0  # the exit code that failure means (4: connection, 5: host key)

    @property
    def stopped(self) -> bool:
        return self.instance is not None and not self.instance.running

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def machine_status(ctx: Context) -> MachineStatus:
    """The instance (type, state, price, uptime, cost so far), then, if it runs, ONE question
    to the machine: GPUs, load, runs, autostop. An instance whose machine does not answer
    within :func:`quick_reach` is shown as EC2 describes it, the machine marked unreachable."""
    instance = provider(ctx).status()
    if instance is not None and not instance.running:
        return MachineStatus(ctx.cfg.target, instance, None, None)
    try:
        with acquire(ctx, within=quick_reach(ctx.cfg) if instance is not None else None) as m:
            return MachineStatus(ctx.cfg.target, instance, m.remote.host, m.answer(verbs.MACHINE, m.root))
    except UNREACHABLE as exc:
        if instance is None:  # nothing else to show: the error is the answer
            raise
        return MachineStatus(ctx.cfg.target, instance, instance.address, None, str(exc), int(exc.exit_code))


def up(ctx: Context) -> InstanceStatus:
    """Start the instance (or create it from ec2.launch) and wait until it answers SSH; then, as
    a reboot loses the autostop watcher (not its setting), start the watcher again if autostop is
    armed."""
    with bring_up(ctx) as (p, m):
        try:
            wake(m)
        except OrchError as exc:
            ctx.log(f"could not check autostop on the machine ({exc}); the next deploy arms it again")
        return p.status()


@dataclass(frozen=True)
class Consent:
    """How `orch down` may go ahead: ``yes`` (-y), else ``ask`` (a terminal's yes/no; None: no
    terminal, so what needs a yes is refused)."""

    yes: bool = False
    ask: Callable[[str], bool] | None = None


def lost_with_disk(run_ids: Sequence[str] | None, stored: StorageHolds | None = None) -> str:
    """What terminating an instance loses with its disk, said before `orch down --terminate`
    asks. ``run_ids``: the runs on it (None: they could not be listed); ``stored``: what the
    storage mirror holds (None: no mirror), whose runs are kept."""
    kept = set(stored.run_ids) if stored is not None else set()
    lost = None if run_ids is None else [r for r in run_ids if r not in kept]
    if lost is None:
        runs = "every run on it (orch could not list them)" + (f" that {stored.uri} lacks" if stored else "")
    elif not lost:
        runs = "no run (there is none on it)" if not run_ids else f"no run (all {len(run_ids)} are in {stored.uri})"
    else:
        runs = f"{len(lost)} run(s): {', '.join(lost)} (`orch download RUN` first keeps a run's best checkpoint)"
    return f"Its disk is deleted with it: the code, envs and data orch put there, and {runs}."


@dataclass(frozen=True)
class StorageHolds:
    """The runs the storage mirror holds (they outlive the instance)."""

    uri: str
    run_ids: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.uri} holds {len(self.run_ids)} run(s)"


def storage_holds(ctx: Context) -> StorageHolds | None:
    """What the storage mirror holds, or None (no mirror, or it cannot be read: said)."""
    store = storage(ctx.cfg)
    if store is None:
        return None
    try:
        return StorageHolds(store.uri, tuple(store.run_ids()))
    except AwsError as exc:
        ctx.log(f"storage cannot be read ({exc})")
        return None


def down(ctx: Context, *, force: bool = False, terminate: bool = False,
         consent: Consent = Consent()) -> InstanceStatus | None:
    """Stop (or terminate) the instance; refuse while a run is active unless ``force``. The
    machine is asked for its runs within :func:`quick_reach`; when it cannot be reached, stopping
    needs a yes (``consent``), as terminating always does. A declined question returns None (the
    instance is left as it is). Stopping and terminating go through EC2, never the machine."""
    p = provider(ctx)
    inst = p.status()
    if inst is None:
        return p.terminate() if terminate else p.stop()  # the provider says why it cannot
    runs, unreachable = _runs(ctx, inst) if inst.running and (terminate or not force) else (None, None)
    active = [r.run_id for r in runs or [] if r.active]
    if active and not force:
        raise BusyError(f"run {', '.join(active)} is still running on {inst.id}: `orch stop` it first, or pass "
                        f"--force to {'terminate' if terminate else 'stop'} the instance anyway (the run dies"
                        + ("" if terminate else "; `orch resume RUN --continue` picks it up later") + ")")
    stored = storage_holds(ctx) if terminate or unreachable else None
    if unreachable and stored is not None:
        unreachable += f" ({stored})"
    if stored is not None and runs is not None:  # kept: only what S3 holds up to the run's last epoch
        stored = replace(stored, run_ids=tuple(r.run_id for r in runs if r.run_id in stored.run_ids and r.mirror
                                               and r.mirror.state == "ok" and r.mirror.epoch == r.epoch))
    lost = lost_with_disk(None if runs is None else [r.run_id for r in runs], stored)
    if terminate:
        mark = "" if inst.managed else ", not created by orch"
        question = f"Terminate instance {inst.id} ({inst.type}{mark})? {lost}"
        refusal: OrchError | None = ConfigError(f"--terminate deletes instance {inst.id} and its disk: orch asks "
                                                "first on a terminal; without one, pass -y")
    else:
        question = f"Stop instance {inst.id} ({inst.type}){' anyway' if unreachable else ''}? Its disk, runs " \
                   "and data stay."
        refusal = None if force or not unreachable else \
            ConnectError(f"{unreachable}; `orch down -y` stops it anyway (a run on it would die)")
    if not consent.yes and consent.ask is None and refusal is not None:
        raise refusal
    if unreachable:
        ctx.log(unreachable)
    if not consent.yes and consent.ask is not None and (terminate or inst.running) and not consent.ask(question):
        return None
    if not terminate:
        return p.stop()
    ctx.log(f"terminating instance {inst.id}. {lost}")
    return p.terminate()


def _runs(ctx: Context, inst: InstanceStatus) -> tuple[list[RunInfo] | None, str | None]:
    """The runs on the machine, or (None, why it could not be asked) within :func:`quick_reach`."""
    try:
        with acquire(ctx, within=quick_reach(ctx.cfg)) as m:
            return m.runs(), None
    except (*UNREACHABLE, RemoteError) as exc:  # a machine that cannot answer never keeps its instance running
        return None, f"cannot ask the machine of {inst.id} ({exc}), so orch could not check for active runs"
