"""`orch deploy --recover` and `orch watch RUN`: stay with a run until it ends, and bring it
back when its machine is taken.

Every ``recover.poll_seconds`` (15 s) the watch asks EC2, never SSH alone, how the instance is,
then the machine how the run is. Only EC2's word counts as a preemption: the instance stopped
or terminated with a spot reason, or the run ``interrupted`` by the notice the machine's
watcher acted on. A machine that does not answer SSH while EC2 says it runs is waited for (one
failed probe is no preemption, SkyPilot #10162), and so is an EC2 that cannot be asked (a
laptop asleep or offline resumes watching without a false recovery).

A preempted run is continued (``orch resume RUN --continue``, with data synced again): on the
same instance once it runs again (interruption: stop), on a new one created from ``ec2.launch``
(terminate; restored from storage by the trainer). A trainer that fails while its instance
lives is the run's own failure: restarted only ``recover.max_restarts_on_errors`` times.
Recoveries are bounded (``recover.max_recoveries`` per ``recover.window`` minutes); a failed
attempt waits ``recover.backoff_seconds``, doubled each time; a success resets that clock.
Each recovery is recorded in the run (wire.Recovery): `orch runs`, `monitor` and the last
line show them. When the run has ended, an instance orch created for it does not stay running
unasked (:func:`_settle`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from orchestrator import ec2, storage
from orchestrator.context import Context
from orchestrator.errors import AwsError, ConfigError, ConnectError, ExitCode, HostKeyError, NoCapacity, OrchError
from orchestrator.machine import Machine
from orchestrator.monitor import LOG_LINES, RunView
from orchestrator.provision import Ec2Provider, acquire, provider, quick_reach
from orchestrator.requests import LaunchOptions
from trainer.contract import layout
from trainer.contract.wire import DIED, Recovery

# EC2's StateReason codes for an instance it took back (stopped, hibernated or terminated).
SPOT_REASON = "Server.SpotInstance"
# A run interrupted by a notice whose instance still runs this long after the notice was not
# taken after all: it is continued where it is.
NOTICE_GRACE_S = 300.0
# Failed attempts at one recovery before the watch gives up (with backoff: 60 s .. 16 min).
ATTEMPTS = 8
BACKOFF_CAP = 16


@dataclass(frozen=True)
class Seen:
    """One look at the run: EC2's word on the instance, then the machine's on the run."""

    instance: ec2.Instance | None = None  # None: no instance (target ssh/local), or EC2 not asked
    ec2_error: str | None = None  # EC2 could not be asked (network down, laptop asleep)
    run: Any = None  # RunInfo from the machine; None: SSH did not answer
    ssh_error: str | None = None


@dataclass(frozen=True)
class Decision:
    """What to do about what was seen: ``wait``, ``ended``, ``preempted`` or ``crashed``."""

    action: str
    why: str = ""
    in_place: bool = False  # preempted: the instance is there again (or was never taken)


def judge(seen: Seen, last_run: Any, now: float) -> Decision:
    """The decision for one look (pure). ``last_run``: the run as last seen (its state when
    the machine went quiet)."""
    inst, run = seen.instance, seen.run
    if seen.ec2_error is not None:
        return Decision("wait", f"EC2 cannot be asked ({seen.ec2_error}); asking again")
    interrupted = (run or last_run) is not None and (run or last_run).shown_state == layout.INTERRUPTED
    if inst is not None and inst.state in ("stopped", "stopping", "terminated", "shutting-down"):
        by_ec2 = (inst.state_reason or "").startswith(SPOT_REASON)
        if not (by_ec2 or interrupted):
            reason = inst.state_reason or "no reason given"
            return Decision("ended", f"instance {inst.instance_id} is {inst.state} ({reason}), not by EC2's spot "
                                     "service: not recovering")
        if inst.state in ("stopping", "shutting-down"):
            return Decision("wait", f"EC2 is taking instance {inst.instance_id} back ({inst.state})")
        return Decision("preempted", f"instance {inst.instance_id} was {inst.state} by EC2 "
                                     f"({inst.state_reason or 'after a spot interruption notice'})")
    if inst is not None and inst.state == "pending":
        return Decision("wait", f"instance {inst.instance_id} is starting")
    if run is None:
        where = f"EC2 says {inst.instance_id} is {inst.state}" if inst is not None else "waiting"
        return Decision("wait", f"the machine does not answer ({seen.ssh_error}); {where}: no recovery for that")
    state = run.shown_state
    if state == layout.INTERRUPTED:
        noticed = run.interruption.noticed_at if run.interruption is not None else None
        if inst is not None and noticed is not None and now - noticed > NOTICE_GRACE_S:
            return Decision("preempted", f"interrupted by a spot notice, but instance {inst.instance_id} still runs "
                                         f"{(now - noticed) / 60:.0f} min later: continuing it there", in_place=True)
        if inst is None:  # target ssh/local: nothing else will take the machine
            return Decision("preempted", "interrupted by a spot notice: continuing it", in_place=True)
        return Decision("wait", f"interrupted by a spot notice: waiting for EC2 to take {inst.instance_id}")
    if state in (layout.FAILED, DIED):
        return Decision("crashed", f"the trainer {'failed' if state == layout.FAILED else 'died'} while its machine "
                                   f"was up ({run.error or 'no final state'})")
    if state in layout.FINAL_STATES:
        return Decision("ended", f"run {run.run_id} is {state}")
    return Decision("wait")


@dataclass
class Budget:
    """Recoveries within the window, and the backoff of failed attempts."""

    limit: int
    window_s: float
    base_s: float
    times: list[float] = field(default_factory=list)
    failures: int = 0

    def allows(self, now: float) -> bool:
        self.times = [t for t in self.times if now - t < self.window_s]
        return len(self.times) < self.limit

    def spent(self, now: float) -> None:
        self.times.append(now)
        self.failures = 0  # the error clock starts again after each success (SkyPilot #10155)

    def backoff(self) -> float:
        """The wait after one more failed attempt: base, 2x, 4x ... up to 16x."""
        self.failures += 1
        return self.base_s * min(2 ** (self.failures - 1), BACKOFF_CAP)


@dataclass
class Outcome:
    """How a watch ended: the run as last seen, its recoveries, and why it gave up (if it did)."""

    view: RunView
    recoveries: list[Recovery] = field(default_factory=list)
    gave_up: str | None = None

    def summary(self) -> str:
        text = self.view.summary()
        return f"{text}; gave up: {self.gave_up}" if self.gave_up else text

    @property
    def exit_code(self) -> ExitCode:
        """How the run ended (as `orch monitor`); a watch that gave up on a run that has not
        ended says so with RUN_STOPPED (it can be continued)."""
        if self.gave_up and not self.view.final:
            return ExitCode.RUN_STOPPED
        return self.view.exit_code


class _Link:
    """The connection to the machine, kept across looks and dropped when it fails."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.stack: contextlib.ExitStack | None = None
        self.machine: Machine | None = None

    def get(self) -> Machine:
        if self.machine is None:
            stack = contextlib.ExitStack()
            try:
                self.machine = stack.enter_context(acquire(self.ctx, within=quick_reach(self.ctx.cfg)))
            except BaseException:
                stack.close()
                raise
            self.stack = stack
        return self.machine

    def drop(self) -> None:
        if self.stack is not None:
            with contextlib.suppress(Exception):
                self.stack.close()
        self.stack, self.machine = None, None


class Watch:
    """One run, watched and recovered until it ends."""

    def __init__(self, ctx: Context, run_id: str, show: Callable[[RunView], None] | None = None,
                 created: set[str] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.ctx, self.cfg, self.show, self.sleep = ctx, ctx.cfg, show, sleep
        self.view = RunView(run_id)
        self.policy = ctx.cfg.recover
        self.budget = Budget(self.policy.max_recoveries, self.policy.window * 60, self.policy.backoff_seconds)
        self.restarts = 0
        self.link = _Link(ctx)
        self.provider = provider(ctx)
        self.instance_id: str | None = None
        self.created: set[str] = set(created or ())  # instances orch created for this run
        self.recoveries: list[Recovery] = []
        self.taken_at: float | None = None  # when the machine was first seen taken
        self.said = ""  # the last note logged

    # ---- looking ----------------------------------------------------------------------------

    def _instance(self) -> tuple[ec2.Instance | None, str | None]:
        if not isinstance(self.provider, Ec2Provider):
            return None, None
        try:
            if self.instance_id is None:
                self.instance_id = self.provider.find().instance_id
            return ec2.describe(self.provider.client, self.instance_id), None
        except AwsError as exc:
            return None, str(exc)

    def look(self) -> Seen:
        inst, ec2_error = self._instance()
        if ec2_error is not None or (inst is not None and inst.state != "running"):
            self.link.drop()
            return Seen(inst, ec2_error)
        try:
            snap = self.link.get().snapshot(self.view.run_id, len(self.view.history), LOG_LINES)
        except (ConnectError, HostKeyError) as exc:
            self.link.drop()
            return Seen(inst, run=None, ssh_error=str(exc))
        except OrchError as exc:  # e.g. the instance went away between the two questions
            self.link.drop()
            return Seen(inst, run=None, ssh_error=str(exc))
        if snap.run.final and inst is not None:
            # An ended run is acted on (restart, or done) only while EC2 still says the instance
            # runs: one taken meanwhile (its disk with it) is EC2's matter, not the trainer's.
            again, ec2_error = self._instance()
            if ec2_error is not None or (again is not None and again.state != "running"):
                self.link.drop()
                return Seen(again, ec2_error)
        self.view.update(snap)
        return Seen(inst, run=snap.run)

    def _note(self, text: str) -> None:
        if text and text != self.said:  # logged once, however many looks say it again
            self.ctx.log(text)
        self.said = text
        self.view.note = text or None
        if self.show is not None:
            self.show(self.view)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> Outcome:
        while True:
            seen = self.look()
            decision = judge(seen, self.view.run, time.time())
            if decision.action == "ended":
                return self._end(decision.why if seen.run is None else None)
            if decision.action == "wait":
                if seen.run is not None and not seen.run.final:
                    self.taken_at = None
                self._note(decision.why)
                self.sleep(self.policy.poll_seconds)
                continue
            self.taken_at = self.taken_at or _interrupted_at(seen.run or self.view.run) or time.time()
            if decision.action == "crashed":
                if self.restarts >= self.policy.max_restarts_on_errors:
                    return self._end(None)
                self.restarts += 1
                why = f"{decision.why}: restart {self.restarts} of {self.policy.max_restarts_on_errors} " \
                      "(recover.max_restarts_on_errors)"
                gave_up = self._recover("restart", why, in_place=True)
            else:
                cannot = self._cannot_replace(seen)
                if cannot is not None:
                    return self._end(cannot)
                if not self.budget.allows(time.time()):
                    return self._end(f"{decision.why}; {len(self.budget.times)} recoveries within "
                                     f"{self.policy.window:g} min already (recover.max_recoveries)")
                gave_up = self._recover("preempted", decision.why, in_place=decision.in_place)
            if gave_up is not None:
                return self._end(gave_up)

    def _cannot_replace(self, seen: Seen) -> str | None:
        """Why a terminated instance cannot be replaced (None: it can, or need not be)."""
        inst = seen.instance
        if inst is None or inst.state != "terminated":
            return None
        if self.cfg.ec2.launch is None:
            return (f"instance {inst.instance_id} was terminated and deploy.yaml has no ec2.launch to create another "
                    f"from; give one (and ec2.name), then `orch resume {self.view.run_id} --continue`")
        if storage.storage(self.cfg) is None:
            return (f"instance {inst.instance_id} was terminated with its disk, and the run has no storage mirror "
                    "(storage.s3_uri) to be restored from")
        return None

    def _recover(self, kind: str, why: str, *, in_place: bool) -> str | None:
        """Continue the run (on its instance again, or a new one); None once it trains again,
        else why the watch gives up."""
        self._note(f"recovering run {self.view.run_id}: {why}")
        self.link.drop()
        # One record for every attempt: the trainer records an `at` once (a launch that failed
        # after the trainer started is not recorded twice), and counts the time lost from it.
        record = Recovery(at=_iso(self.taken_at or time.time()), why=why, kind=kind, old_instance=self.instance_id,
                          epoch_restored=self.view.run.epoch if self.view.run is not None else None)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                launched = self._continue(record, with_data=not in_place)
            except (ConfigError, HostKeyError) as exc:  # retrying cannot help: the user must act
                return f"recovery impossible: {exc}"
            except OrchError as exc:
                if attempt == ATTEMPTS:
                    return f"recovery failed {ATTEMPTS} times, last: {exc}"
                wait = self.budget.backoff()
                what = "EC2 has no capacity" if isinstance(exc, NoCapacity) else "recovery attempt failed"
                self._note(f"{what} ({exc}); trying again in {wait:.0f} s (attempt {attempt + 1} of {ATTEMPTS})")
                self.sleep(wait)
                continue
            self.budget.spent(time.time())
            self.recoveries.append(launched)
            self.taken_at = None
            self._note(f"run {self.view.run_id} continues on {launched.new_instance or 'its machine'} from its last "
                       f"committed epoch ({launched.epoch_restored} when last seen)")
            return None
        return "unreachable"  # pragma: no cover (the loop returns)

    def _continue(self, record: Recovery, *, with_data: bool) -> Recovery:
        """One attempt: the instance running (started or created), the run continued there
        (the trainer records ``record`` with the epoch it continues from and the time lost)."""
        from orchestrator.deploy import resume

        def complete(m: Machine) -> Recovery:
            new = m.instance.instance_id if m.instance is not None else None
            if new is not None and m.created:
                self.created.add(new)
            return replace(record, new_instance=new)

        sync = with_data and bool(self.cfg.data.local_dir)
        launched = resume(self.ctx, self.view.run_id, in_place=True, with_data=sync, launching=LaunchOptions(),
                          recovery=complete)
        self.instance_id = launched.instance_id or self.instance_id
        return launched.extra["recovery"]

    def _end(self, gave_up: str | None) -> Outcome:
        """The run has ended (or the watch gives up): leave no instance running unasked."""
        self.link.drop()
        if gave_up is not None:
            self._note(f"giving up: {gave_up}")
        self._settle()
        return Outcome(self.view, self.recoveries, gave_up)

    def _settle(self) -> None:
        """An instance this watch created for the run stops once nothing runs there (autostop,
        when armed, does it on the machine itself; a one-time spot instance cannot be stopped:
        it is terminated, its run kept in storage)."""
        if not isinstance(self.provider, Ec2Provider) or self.instance_id not in self.created:
            return
        if self.cfg.autostop.idle_minutes is not None:
            self.ctx.log(f"instance {self.instance_id} was created for this run: autostop stops it after "
                         f"{self.cfg.autostop.idle_minutes:g} idle minutes")
            return
        inst, _ = self._instance()
        if inst is None or inst.state not in ("running", "pending"):
            return
        one_time = inst.spot and self.provider.one_time_spot
        self.ctx.log(f"{'terminating' if one_time else 'stopping'} instance {inst.instance_id}: orch created it for "
                     "this run, which has ended, and autostop is off")
        with contextlib.suppress(OrchError):
            self.provider.park(inst.instance_id, created=True)


def watch(ctx: Context, run_id: str | None, *, created: set[str] | None = None,
          show: Callable[[RunView], None] | None = None) -> Outcome:
    """Follow a run to its end, recovering it when its machine is taken (`orch watch`).
    ``created``: instances orch created for this run (they do not outlive it)."""
    check_recoverable(ctx)
    chosen = storage.machine_or_storage(ctx, lambda m: m.choose(run_id).run_id, lambda s: s.choose(run_id).run_id)
    return Watch(ctx, chosen, show, created).run()


def check_recoverable(ctx: Context) -> None:
    """What recovering needs, checked before anything is launched: a run that can outlive its
    disk when a spot instance may be terminated."""
    launch = ctx.cfg.ec2.launch if ctx.cfg.target == "ec2" else None
    if launch is not None and launch.spot is not None and launch.spot.interruption == "terminate" \
            and storage.storage(ctx.cfg) is None:
        raise ConfigError("--recover with ec2.launch.spot.interruption: terminate needs storage.s3_uri: the run's "
                          "only copy would go with the instance")


def _interrupted_at(run: Any) -> float | None:
    if run is None or getattr(run, "interruption", None) is None:
        return None
    return run.interruption.noticed_at


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


