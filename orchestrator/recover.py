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
from typing import TYPE_CHECKING, Any

from orchestrator import ec2, storage
from orchestrator.context import Context
from orchestrator.errors import (
    AwsError,
    ConfigError,
    ConnectError,
    ExitCode,
    HostKeyError,
    InstanceStopped,
    NoCapacity,
    OrchError,
    RemoteError,
)
from orchestrator.machine import IDLE, Machine, Snapshots
from orchestrator.monitor import LOG_LINES, RunView
from orchestrator.provision import Ec2Provider, acquire, provider, quick_reach
from orchestrator.requests import LaunchOptions
from orchestrator.runs import UPLOAD_TIMEOUT
from trainer.contract import layout
from trainer.contract.wire import DIED, Recovery, Snapshot

if TYPE_CHECKING:
    from orchestrator.config import DeployConfig

# EC2's StateReason codes for an instance it took back (stopped, hibernated or terminated).
SPOT_REASON = "Server.SpotInstance"
# A run interrupted by a notice whose instance still runs this long after the notice was not
# taken after all: it is continued where it is.
NOTICE_GRACE_S = 300.0
# Failed attempts at one recovery before the watch gives up (with backoff: 60 s .. 16 min).
ATTEMPTS = 8
BACKOFF_CAP = 16
# EC2 says the instance runs, SSH has not answered for this long: the watch gives up (a wedged
# machine is no preemption, and recreating a live instance would double the bill).
UNREACHABLE_S = 1800.0
# AWS error codes of an instance EC2 no longer knows (terminated a while ago).
GONE_CODES = ("InvalidInstanceID.NotFound",)
# What a recovery attempt may fail with that trying again (later) may fix (of AWS's errors: no
# capacity, and the codes ec2.passes).
RETRYABLE = (ConnectError, RemoteError, AwsError)


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
    if inst is not None and inst.state in ("stopping", "shutting-down"):  # its last word (and reason) comes next
        return Decision("wait", f"instance {inst.instance_id} is {inst.state}")
    if inst is not None and inst.state in ("stopped", "terminated"):
        by_ec2 = (inst.state_reason or "").startswith(SPOT_REASON)
        if not (by_ec2 or interrupted):
            reason = inst.state_reason or "no reason given"
            return Decision("ended", f"instance {inst.instance_id} is {inst.state} ({reason}), not by EC2's spot "
                                     "service: not recovering")
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
    if run.final:  # finished, stopped by the user, or broken (nothing to continue)
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
    """The connection to the machine, kept across looks and dropped when it fails; and the
    run's snapshots, from one long-lived command on it (orchestrator.machine.Snapshots)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.stack: contextlib.ExitStack | None = None
        self.machine: Machine | None = None
        self.feed: Snapshots | None = None

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

    def snapshot(self, run_id: str, metrics_offset: int) -> Snapshot:
        machine = self.get()
        if self.feed is None:
            assert self.stack is not None
            idle = max(IDLE, 3 * self.ctx.cfg.recover.poll_seconds)
            self.feed = self.stack.enter_context(machine.snapshots(run_id, idle=idle))
        return self.feed.get(metrics_offset, LOG_LINES)

    def drop(self) -> None:
        if self.stack is not None:
            with contextlib.suppress(Exception):
                self.stack.close()
        self.stack, self.machine, self.feed = None, None, None


class Watch:
    """One run, watched and recovered until it ends."""

    def __init__(self, ctx: Context, run_id: str, show: Callable[[RunView], None] | None = None,
                 created: set[str] | None = None, launching: LaunchOptions = LaunchOptions(),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.ctx, self.cfg, self.show, self.sleep, self.launching = ctx, ctx.cfg, show, sleep, launching
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
        self.unreachable_since: float | None = None  # EC2 says running, SSH has not answered since
        self.said = ""  # the last note logged

    # ---- looking ----------------------------------------------------------------------------

    def _instance(self) -> tuple[ec2.Instance | None, str | None]:
        """EC2's word: the instance (a synthesized terminated one when EC2 no longer knows it),
        or why EC2 could not be asked now (the network, throttling: ask again). Any other AWS
        error (credentials expired, access refused) ends the watch: waiting cannot fix it."""
        if not isinstance(self.provider, Ec2Provider):
            return None, None
        try:
            if self.instance_id is None:
                found = ec2.find_instance(self.provider.client, self.cfg.ec2, missing_ok=True)
                if found is None:
                    return _gone(None), None
                self.instance_id = found.instance_id
            return ec2.describe(self.provider.client, self.instance_id), None
        except StopIteration:  # described, but not in the answer: EC2 has forgotten it
            return _gone(self.instance_id), None
        except AwsError as exc:
            if exc.code in GONE_CODES:
                return _gone(self.instance_id), None
            if not ec2.passes(exc.code):
                raise
            return None, str(exc)

    def look(self) -> Seen:
        inst, ec2_error = self._instance()
        if ec2_error is not None or (inst is not None and inst.state != "running"):
            self.link.drop()
            return Seen(inst, ec2_error)
        try:
            snap = self.link.snapshot(self.view.run_id, len(self.view.history))
        except (ConnectError, HostKeyError, RemoteError) as exc:  # the machine did not answer (or not sanely)
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
        try:
            return self._run()
        finally:  # an interrupt, or a caller's `show` raising (a sweep's pruner), leaves no connection open
            self.link.drop()

    def _run(self) -> Outcome:
        while True:
            seen = self.look()
            decision = judge(seen, self.view.run, time.time())
            if decision.action == "ended":
                return self._end(None if seen.run is not None or self._ended_in_storage() else decision.why)
            if decision.action == "wait":
                gave_up = self._waited(seen, decision.why)
                if gave_up is not None:
                    return self._end(gave_up, park=False)
                continue
            self.unreachable_since = None
            self.taken_at = self.taken_at or _interrupted_at(seen.run or self.view.run) or time.time()
            if decision.action == "crashed":
                if self.restarts >= self.policy.max_restarts_on_errors:
                    return self._end(None)
                self.restarts += 1
                why = f"{decision.why}: restart {self.restarts} of {self.policy.max_restarts_on_errors} " \
                      "(recover.max_restarts_on_errors)"
                gave_up = self._recover("restart", why, in_place=True)
            else:
                gave_up = self._cannot_replace(seen) or self._restarted(seen)
                if gave_up is None and not self.budget.allows(time.time()):
                    gave_up = (f"{decision.why}; {len(self.budget.times)} recoveries within {self.policy.window:g} "
                               "min already (recover.max_recoveries)")
                if gave_up is None:
                    stopped = seen.instance is not None and seen.instance.state == "stopped"
                    gave_up = self._recover("preempted", decision.why, in_place=decision.in_place or stopped)
            if gave_up is not None:
                return self._end(gave_up)

    def _ended_in_storage(self) -> bool:
        """Whether the storage mirror says the run ended (while nobody watched: its instance
        then stopped by autostop); the view then shows how."""
        store = storage.storage(self.cfg)
        if store is None:
            return False
        try:
            run = store.choose(self.view.run_id)
        except OrchError:
            return False
        if not run.final or run.shown_state == layout.INTERRUPTED:
            return False
        self.view.run = run
        return True

    def _waited(self, seen: Seen, why: str) -> str | None:
        """One wait; why the watch gives up when the machine has been silent too long while
        EC2 says it runs (a wedged machine is no preemption: nothing to recover it from)."""
        if seen.run is not None and not seen.run.final:
            self.taken_at = None
        silent = seen.run is None and seen.ssh_error is not None and seen.instance is not None
        now = time.time()
        self.unreachable_since = (self.unreachable_since or now) if silent else None
        if self.unreachable_since is not None and now - self.unreachable_since > UNREACHABLE_S:
            return (f"instance {self.instance_id} has not answered SSH for {UNREACHABLE_S / 60:.0f} min while EC2 says "
                    f"it runs (it is billed): look at it (`orch status`, its console), or `orch down` it")
        self._note(why)
        self.sleep(self.policy.poll_seconds)
        return None

    def _cannot_replace(self, seen: Seen) -> str | None:
        """Why a terminated instance cannot be replaced (None: it can, or need not be)."""
        inst = seen.instance
        if inst is None or inst.state != "terminated":
            return None
        what = f"instance {inst.instance_id}" if inst.instance_id != "?" else "the instance"
        if self.cfg.ec2.launch is None:
            return (f"{what} was terminated and deploy.yaml has no ec2.launch to create another from; give one (and "
                    f"ec2.name), then `orch resume {self.view.run_id} --continue`")
        if storage.storage(self.cfg) is None:
            return f"{what} was terminated with its disk, and the run has no storage mirror (storage.s3_uri) to be " \
                   "restored from"
        return None

    def _restarted(self, seen: Seen) -> str | None:
        """A stopped (spot) instance, running again: EC2 starts a persistent request's instance
        itself when capacity returns (and may refuse orch's own start meanwhile). None once it
        runs; why the watch gives up after ``recover.window`` minutes of waiting (a stopped
        instance costs only its disk meanwhile)."""
        if seen.instance is None or seen.instance.state != "stopped":
            return None
        client, deadline = self.provider.client, time.time() + self.policy.window * 60  # type: ignore[attr-defined]
        next_start = 0.0
        while time.time() < deadline:
            inst, error = self._instance()
            if inst is not None and inst.state == "running":
                return None
            if inst is not None and inst.state == "stopped" and time.time() >= next_start:
                try:
                    ec2.start(client, inst.instance_id)
                    self._note(f"starting instance {inst.instance_id} again")
                except AwsError as exc:  # EC2 alone restarts an instance it stopped, when it can
                    wait = self.budget.backoff()
                    next_start = time.time() + wait
                    self._note(f"EC2 has not started instance {inst.instance_id} again ({exc.code or exc}); waiting "
                               f"for it (asking again in {wait:.0f} s)")
            elif error is not None:
                self._note(f"EC2 cannot be asked ({error}); asking again")
            self.sleep(self.policy.poll_seconds)
        self._cancel_request(seen.instance)
        return f"instance {seen.instance.instance_id} was not started again within {self.policy.window:g} min " \
               "(recover.window)"

    def _cancel_request(self, inst: ec2.Instance) -> None:
        """Giving up on a stopped spot instance orch created: its persistent request would have
        EC2 start it (and bill it) with nobody watching; it is cancelled."""
        if inst.instance_id not in self.created or not inst.spot_request:
            if inst.spot:
                self.ctx.log(f"EC2 may start spot instance {inst.instance_id} again when capacity returns, with nobody "
                             "watching (its autostop is not running then): `orch down --terminate` ends it")
            return
        try:
            ec2.cancel_spot_request(self.provider.client, inst.spot_request, self.ctx.log)  # type: ignore[attr-defined]
        except OrchError as exc:
            self.ctx.log(f"could not cancel spot request {inst.spot_request} ({exc}): EC2 may start instance "
                         f"{inst.instance_id} again unwatched; `orch down --terminate` ends it")

    def _recover(self, kind: str, why: str, *, in_place: bool) -> str | None:
        """Continue the run (on its instance again, or a new one); None once it trains again,
        else why the watch gives up."""
        self._note(f"recovering run {self.view.run_id}: {why}")
        self.link.drop()
        # One record for every attempt: the trainer records an `at` once (a launch that failed
        # after the trainer started is not recorded twice), and counts the time lost from it.
        record = Recovery(at=_iso(self.taken_at or time.time()), why=why, kind=kind, old_instance=self.instance_id,
                          epoch_restored=self.view.run.epoch if self.view.run is not None else None)
        # A restart is one launch (a trainer that fails again is the run's failure); a move to
        # another machine is retried while what failed may pass.
        attempts = 1 if kind == "restart" else ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                launched = self._continue(record, with_data=not in_place)
            except RETRYABLE as exc:
                unfixable = isinstance(exc, AwsError) and not (isinstance(exc, NoCapacity) or ec2.passes(exc.code))
                if attempt == attempts or unfixable:
                    return f"recovery failed ({exc})" if attempts == 1 else \
                        f"recovery failed {attempt} times, last: {exc}"
                wait = self.budget.backoff()
                what = "EC2 has no capacity" if isinstance(exc, NoCapacity) else "recovery attempt failed"
                self._note(f"{what} ({exc}); trying again in {wait:.0f} s (attempt {attempt + 1} of {attempts})")
                self.sleep(wait)
                continue
            except OrchError as exc:  # a config, host key, data or preflight problem: the user must act
                return f"recovery impossible: {exc}"
            if kind == "preempted":
                self.budget.spent(time.time())
            else:
                self.budget.failures = 0
            self.recoveries.append(launched)
            self.taken_at = None
            self.view.run = None  # the run as it was before is no word on the continued one
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
            if new is not None:  # known at once: a later failure leaves nothing unwatched
                self.instance_id = new
                if m.created or (record.old_instance is not None and new != record.old_instance):
                    self.created.add(new)  # made for this run (by this attempt, or an earlier failed one)
            return replace(record, new_instance=new)

        sync = with_data and bool(self.cfg.data.local_dir)
        launched = resume(self.ctx, self.view.run_id, in_place=True, with_data=sync, recovery=complete,
                          launching=replace(self.launching, force=False))
        return launched.extra["recovery"]

    def _end(self, gave_up: str | None, *, park: bool = True) -> Outcome:
        """The run has ended (or the watch gives up): leave no instance running unasked."""
        if gave_up is not None:
            self._note(f"giving up: {gave_up}")
        if park:
            self._exited()
            self._settle()
        self.link.drop()
        return Outcome(self.view, self.recoveries, gave_up)

    def _exited(self) -> None:
        """Wait (bounded) for an ended run's trainer to exit: it uploads its final state to
        storage first, and its instance must not be stopped under it."""
        deadline = time.time() + UPLOAD_TIMEOUT
        while self.view.alive and time.time() < deadline:
            self.sleep(min(2.0, self.policy.poll_seconds))
            seen = self.look()
            if seen.run is None:
                return

    def _settle(self) -> None:
        """An instance orch created for the run stops once the run has ended (autostop, when
        armed, does it on the machine itself; a one-time spot instance cannot be stopped: it is
        terminated, its run kept in storage)."""
        if not isinstance(self.provider, Ec2Provider) or self.instance_id not in self.created:
            return
        minutes = _autostop_minutes(self.cfg, self.launching)
        if minutes is not None:
            self.ctx.log(f"instance {self.instance_id} was created for this run: autostop stops it after {minutes:g} "
                         "idle minutes")
            return
        inst, _ = self._instance()
        if inst is None or inst.state not in ("running", "pending"):
            return
        one_time = inst.spot and self.provider.one_time_spot
        self.ctx.log(f"{'terminating' if one_time else 'stopping'} instance {inst.instance_id}: orch created it for "
                     "this run, which has ended, and autostop is off")
        try:
            self.provider.park(inst.instance_id, created=True)
        except OrchError as exc:
            self.ctx.log(f"could not {'terminate' if one_time else 'stop'} instance {inst.instance_id} ({exc}): it is "
                         f"still RUNNING and billed; `orch down{' --terminate' if one_time else ''}` ends it")


def watch(ctx: Context, run_id: str | None, *, created: set[str] | None = None,
          launching: LaunchOptions = LaunchOptions(), show: Callable[[RunView], None] | None = None) -> Outcome:
    """Follow a run to its end, recovering it when its machine is taken (`orch watch`).
    ``created``: instances orch created for this run (they do not outlive it); ``launching``:
    the options a continued run is launched with (the deploy's)."""
    check_recoverable(ctx)
    return Watch(ctx, _chosen(ctx, run_id), show, created, launching).run()


def _chosen(ctx: Context, run_id: str | None) -> str:
    """The run's full id: from the machine, else the storage mirror; a full id as given when
    neither can say (a stopped instance whose run was interrupted)."""
    try:
        return storage.machine_or_storage(ctx, lambda m: m.choose(run_id).run_id, lambda s: s.choose(run_id).run_id)
    except (InstanceStopped, *storage.CANNOT_ANSWER):
        if run_id is not None and layout.is_run_id(run_id):
            return run_id
        raise


def check_recoverable(ctx: Context) -> None:
    """What recovering needs, checked before anything is launched: a run that can outlive its
    disk when a spot instance may be terminated, and data a new instance can be sent."""
    launch = ctx.cfg.ec2.launch if ctx.cfg.target == "ec2" else None
    if launch is None or launch.spot is None or launch.spot.interruption != "terminate":
        return
    if storage.storage(ctx.cfg) is None:
        raise ConfigError("--recover with ec2.launch.spot.interruption: terminate needs storage.s3_uri: the run's "
                          "only copy would go with the instance")
    if not ctx.cfg.data.local_dir:
        raise ConfigError("--recover with ec2.launch.spot.interruption: terminate needs data.local_dir: a new "
                          "instance gets its data from there")


def _autostop_minutes(cfg: DeployConfig, launching: LaunchOptions) -> float | None:
    """The idle minutes autostop was armed with by the launch (None: off)."""
    from orchestrator.autostop import plan

    chosen = plan(cfg, launching.autostop)
    return chosen.idle_minutes if chosen.change else cfg.autostop.idle_minutes


def _gone(instance_id: str | None) -> ec2.Instance:
    """An instance EC2 no longer knows (terminated long ago), as EC2 would describe it."""
    return ec2.Instance(instance_id or "?", "terminated", None, None, None)


def _interrupted_at(run: Any) -> float | None:
    """When the run was interrupted (the machine's clock), if that is a time at all."""
    noticed = run.interruption.noticed_at if run is not None and getattr(run, "interruption", None) else None
    now = time.time()
    return noticed if isinstance(noticed, (int, float)) and now - 30 * 86400 < noticed < now + 86400 else None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
