"""``orch sweep run`` and ``orch sweep status``: an Optuna study (ask and tell) whose trials
are ordinary orch runs, launched with orchestrator.deploy.deploy (a pruned run is stopped with
orchestrator.runs.stop, and kept).

Each trial's run is followed as `orch watch` follows one (orchestrator.recover.watch): a run
whose (spot) machine is taken is recovered, not failed, as recover: in deploy.yaml says.

The study is the state. A trial's run id is written into its user attributes *before* the run
is launched, so a killed ``orch sweep run``, started again, adopts each trial the study still
calls RUNNING: it follows the run that exists (or settles the one that ended meanwhile), and
launches only a trial whose run never started. Nothing is launched twice. One ``orch sweep run``
per study on this computer at a time (a lock file beside deploy.yaml).

``parallel: 1``: trials one after another on the config's one machine. ``parallel: N`` (target
ec2 with ec2.launch): N trials at once, each on one of the sweep's own instances (named
<ec2.name>-<sweep>-<k>, tagged orch:sweep, created from ec2.launch by the first trial's deploy and
reused by the next ones), each machine followed by its own thread; the machine a trial runs on is
in its user attributes too, so a continued sweep follows it there. When the sweep ends with no
trial under way, its instances are stopped (or terminated, or kept) as the spec's ``after`` says.
Optuna is imported here only, lazily: ``orch --help`` never loads it, and the trainer never needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orchestrator.config import DeployConfig, Ec2SpotConfig
from orchestrator.context import Context
from orchestrator.deploy import deploy, new_run_id
from orchestrator.errors import AwsError, BusyError, ConfigError, ConnectionLost, NoSuchRun, OrchError, RemoteError
from orchestrator.monitor import RunView
from orchestrator.recover import check_recoverable, watch
from orchestrator.requests import LaunchOptions
from orchestrator.runs import stop as stop_runs
from orchestrator.sweepspec import MAX_PARALLEL, SweepSpec
from trainer.contract import layout, options

if TYPE_CHECKING:
    import optuna

# The trial's user attributes orch keeps (the study is the state: nothing else is).
RUN_ID = "run_id"  # set before the run is launched
SECONDS = "seconds"  # the trial's length, launch to end, as this computer saw it (what a budget counts)
ENDED = "ended"  # how its run ended, or why the trial failed
PRUNED_AT = "pruned_at"  # the epoch the pruner stopped it at (set before the run is stopped)
MACHINE = "machine"  # which of the sweep's own instances (1..parallel) runs it; absent: the config's machine
GPU = "gpu"  # per_gpu: the GPU of the config's machine it runs on alone; absent: all of them
SWEEP_TAG = "orch:sweep"  # the tag on the sweep's own instances: the sweep's name


@dataclass
class Stopping:
    """Ctrl-C during a sweep: the first stops launching, the second stops the running trials,
    a third exits at once."""

    asked: int = 0


@dataclass
class Shared:
    """What the machines of one `orch sweep run` share: the study's ask is one at a time."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    launched: list[str] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)  # each place's, as it came: none is launched after
    why: str | None = None  # why launching stopped (the first machine to stop says)
    # per_gpu: one machine for every place, so one launch at a time (the first creates or starts
    # it; the next find it running, and never stop it under the others' runs when they fail)
    launching: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class TrialRow:
    """One trial as ``orch sweep status`` shows it."""

    number: int
    state: str  # Optuna's: RUNNING, COMPLETE, PRUNED, FAIL, WAITING
    params: dict[str, Any]
    value: float | None
    run_id: str | None
    seconds: float | None
    ended: str | None

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "state": self.state, "params": self.params, "value": self.value,
                "run_id": self.run_id, "seconds": self.seconds, "ended": self.ended}


@dataclass(frozen=True)
class SweepStatus:
    """A study: its trials, the best, and what the trials took (and cost, where a price is known)."""

    name: str
    storage: str  # credentials taken out
    objective: str
    direction: str
    planned: int
    trials: list[TrialRow]
    best: TrialRow | None
    hours: float
    hourly_usd: float | None
    stopped: str | None = None  # why `orch sweep run` stopped launching (None: `orch sweep status`)
    launched: list[str] = field(default_factory=list)  # the run ids this `orch sweep run` launched

    @property
    def usd(self) -> float | None:
        return None if self.hourly_usd is None else self.hours * self.hourly_usd

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "storage": self.storage, "objective": self.objective, "direction": self.direction,
                "planned": self.planned, "trials": [t.to_json() for t in self.trials],
                "best": self.best.to_json() if self.best else None, "hours": self.hours, "usd": self.usd,
                "hourly_usd": self.hourly_usd, "stopped": self.stopped, "launched": self.launched}


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # orch says what happens, once
    return optuna


def _pruner(spec: SweepSpec) -> Any:
    optuna = _optuna()
    p = spec.pruner
    if p is None:
        return optuna.pruners.NopPruner()
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    return optuna.pruners.HyperbandPruner(min_resource=p.min_epochs)


def shown_url(url: str) -> str:
    """A storage URL as orch shows it: a password never (postgresql://u:p@host -> postgresql://***@host)."""
    return re.sub(r"://[^/@\s]*@", "://***@", url)


def open_study(ctx: Context, spec: SweepSpec, *, create: bool) -> Any:
    """The spec's study in its storage (created, with ``create``), its pruner and sampler set."""
    optuna = _optuna()
    url = spec.storage_url(ctx.cfg)
    direction = "maximize" if spec.maximize else "minimize"
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as exc:  # SQLAlchemy's and Optuna's errors alike: a URL that does not open
        raise ConfigError(f"storage {shown_url(url)}: cannot be opened ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    # constant_liar: trials asked while others run (parallel) are not drawn where those are
    sampler, pruner = optuna.samplers.TPESampler(seed=spec.seed, constant_liar=spec.parallel > 1), _pruner(spec)
    try:
        if create:
            study = optuna.create_study(study_name=spec.name, storage=storage, direction=direction, sampler=sampler,
                                        pruner=pruner, load_if_exists=True)
        else:
            study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError as exc:
        raise ConfigError(f"no study {spec.name!r} in {shown_url(url)}; `orch sweep run` starts it") from exc
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {spec.name!r} in {shown_url(url)} was started to {study.direction.name.lower()}, "
                          f"the spec says {direction}: give the sweep another name")
    if spec.seed is not None:  # a continued study must not draw the first trials' parameters again
        study.sampler = optuna.samplers.TPESampler(seed=spec.seed + len(study.get_trials(deepcopy=False)),
                                                   constant_liar=spec.parallel > 1)
    objective = study.user_attrs.get("objective")
    if objective is None and create:
        study.set_user_attr("objective", spec.objective)
    elif objective is not None and objective != spec.objective:
        raise ConfigError(f"study {spec.name!r} was started with objective {objective}, the spec says "
                          f"{spec.objective}: give the sweep another name")
    return study


def hourly_price(ctx: Context) -> float | None:
    """What an hour of the machine costs: ec2.hourly_price, else the instance's price as `orch
    status` gives it (target ec2); None: unknown (target ssh/local without ec2.hourly_price)."""
    if ctx.cfg.ec2.hourly_price is not None:
        return ctx.cfg.ec2.hourly_price
    if ctx.cfg.target != "ec2":
        return None
    from orchestrator import cost
    from orchestrator.provision import provider

    try:
        inst = provider(ctx).status()
    except (AwsError, ConfigError):  # none yet (a sweep's own, created by its first trial): its type's price
        launch = ctx.cfg.ec2.launch
        return cost.table_price(launch.instance_type) if launch is not None else None
    return inst.cost.hourly_usd if inst is not None else None


def suggest(trial: Any, spec: SweepSpec) -> dict[str, Any]:
    """The trial's value of each swept option (Optuna's ask, one distribution per option)."""
    params: dict[str, Any] = {}
    for name, dim in spec.space.items():
        if dim.choices is not None:
            params[name] = trial.suggest_categorical(name, dim.choices)
        elif options.BY_NAME[name].type is int:
            step = int(dim.step) if dim.step is not None else 1
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), step=step, log=dim.log)
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
    return params


def objective_value(spec: SweepSpec, view: RunView) -> float | None:
    """The run's recorded best: its best checkpoint's val accuracy, or the best epoch of the
    objective's metrics field (None: no epoch recorded one)."""
    if spec.objective == "best_val_accuracy":
        best = view.info.best_val_accuracy
        return best if best is not None and math.isfinite(best) else None
    values = [v for e in view.history if (v := getattr(e, spec.metric)) is not None and math.isfinite(v)]
    return (max if spec.maximize else min)(values) if values else None


class _Pruned(Exception):
    def __init__(self, epoch: int) -> None:
        super().__init__(f"pruned at epoch {epoch}")
        self.epoch = epoch


class _Reporter:
    """Monitor's ``show``: each new epoch's objective metric reported to the trial; the pruner's
    verdict asked while the run still trains (a run that ended is judged by its end)."""

    def __init__(self, trial: Any, metric: str, reported: set[int], stopping: Stopping) -> None:
        self.trial, self.metric, self.reported, self.stopping = trial, metric, set(reported), stopping

    def __call__(self, view: RunView) -> None:
        if self.stopping.asked > 1 and not view.final:  # the second Ctrl-C (a run that ended is settled)
            raise KeyboardInterrupt
        for epoch in view.history:  # one refresh may bring several epochs: each judged as it came
            value = getattr(epoch, self.metric)
            if epoch.epoch in self.reported or value is None or not math.isfinite(value):
                continue
            self.trial.report(value, step=epoch.epoch)
            self.reported.add(epoch.epoch)
            if view.alive and not view.final and self.trial.should_prune():
                raise _Pruned(epoch.epoch)


class Sweep:
    """One place of an `orch sweep run`, running the study's trials there one after another: a
    machine (``slot`` 0: the config's; 1..parallel: the sweep's own instances), or with per_gpu
    one ``gpu`` of the config's machine."""

    def __init__(self, ctx: Context, spec: SweepSpec, study: Any, *, launching: LaunchOptions,
                 stopping: Stopping, shared: Shared | None = None, slot: int = 0, gpu: int | None = None) -> None:
        self.ctx, self.spec, self.study, self.slot, self.gpu = ctx, spec, study, slot, gpu
        self.launching, self.stopping = replace(launching, gpu=gpu) if gpu is not None else launching, stopping
        self.shared = shared or Shared()
        self.optuna = _optuna()

    @property
    def launched(self) -> list[str]:
        return self.shared.launched

    def work(self, price: float | None, *, new: bool = True) -> None:
        """This machine's part: its trials a killed sweep left, then (``new``) new ones until the
        sweep stops launching. A failure stops the others' launching too, and is raised by :func:`run`."""
        try:
            self.adopt()
            while new and (asked := self._ask(price)) is not None:
                with contextlib.suppress(_Settled):
                    self._run_trial(*asked)
        except KeyboardInterrupt:  # the second Ctrl-C: this machine's trial was stopped
            pass
        except Exception as exc:  # said at once; the others launch nothing more, and run() raises the first
            self.shared.failures.append(exc)
            self.ctx.log(f"{exc if isinstance(exc, OrchError) else repr(exc)}; no further trial is launched")

    def adopt(self) -> None:
        """Settle this machine's trials a killed `orch sweep run` left RUNNING (oldest first)."""
        for frozen in running_trials(self.study, (self.slot, self.gpu)):
            trial = self.optuna.trial.Trial(self.study, frozen._trial_id)
            run_id = frozen.user_attrs.get(RUN_ID)
            if run_id is None:  # killed between Optuna's ask and the run id: nothing was launched
                self._fail(trial, "never launched (orch sweep run was stopped before its launch)")
                continue
            if not isinstance(run_id, str) or not layout.is_run_id(run_id):  # a shared storage is another's input
                self._fail(trial, f"its run id {str(run_id)[:80]!r} is not one orch makes")
                continue
            self.ctx.log(f"trial {frozen.number}: adopting run {run_id}")
            self._follow(trial, run_id, frozen.params, set(frozen.intermediate_values),
                         pruned_at=frozen.user_attrs.get(PRUNED_AT))

    def why_stop(self, price: float | None) -> str | None:
        """Why no further trial is launched now (None: launch one)."""
        trials = self.study.get_trials(deepcopy=False)
        if len(trials) >= self.spec.trials:
            return f"the study has its {self.spec.trials} trials"
        if self.stopping.asked:
            return "Ctrl-C"
        if self.shared.failures:
            return "a machine failed"
        budget = self.spec.budget
        if budget is None:
            return None
        lengths = [t.user_attrs[SECONDS] for t in trials if isinstance(t.user_attrs.get(SECONDS), (int, float))]
        mean = sum(lengths) / len(lengths) / 3600 if lengths else 0.0
        # The trials under way on the other machines count what they took so far (at least the
        # mean length, in all), the next one the mean length.
        now = datetime.now()
        taking = [(now - t.datetime_start).total_seconds() / 3600 for t in trials
                  if t.state.name == "RUNNING" and t.datetime_start is not None]
        spent = sum(lengths) / 3600 + sum(taking)
        expected = mean + sum(max(0.0, mean - h) for h in taking)
        if budget.instance_hours is not None and spent + expected > budget.instance_hours:
            return (f"budget: {spent:.3f} instance-hours spent, the next trial (about {expected:.3f} h) would pass "
                    f"{budget.instance_hours:g}")
        if budget.usd is not None and price is not None and (spent + expected) * price > budget.usd:
            return (f"budget: ${spent * price:.2f} spent, the next trial (about ${expected * price:.2f}) would pass "
                    f"${budget.usd:g}")
        return None

    def _ask(self, price: float | None) -> tuple[Any, str, dict[str, Any]] | None:
        """A new trial for this machine, its run id and parameters (None: no further trial, and
        the log says why). One machine at a time: the trials and budget counts hold."""
        with self.shared.lock:
            if (why := self.why_stop(price)) is not None:
                self.shared.why = self.shared.why or why
                return None
            trial = self.study.ask()
            params = suggest(trial, self.spec)  # before the run id: a run is launched with what the trial holds
            if self.slot:  # before the run id too: a trial with a run id is followed where this says
                trial.set_user_attr(MACHINE, self.slot)
            if self.gpu is not None:
                trial.set_user_attr(GPU, self.gpu)
            run_id = new_run_id()
            trial.set_user_attr(RUN_ID, run_id)  # before the launch: a killed sweep finds the run again
            return trial, run_id, params

    def _run_trial(self, trial: Any, run_id: str, params: dict[str, Any]) -> None:
        """Launch the trial's run, follow it to its end, tell the result. A second Ctrl-C during
        the launch: in the main thread (one place) it interrupts the launch; in a place's thread
        the run is stopped at its first look."""
        try:
            self._launch(trial, run_id, params)
        except KeyboardInterrupt:
            self._interrupted(trial, run_id)
            raise
        self._follow(trial, run_id, params, set())

    def _launch(self, trial: Any, run_id: str, params: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.ctx.log(f"trial {trial.number}: launching run {run_id} ({shown})")
        # The sweep's own instances get the data from data.local_dir (new ones have none)
        with_data = self.slot > 0 and bool(self.ctx.cfg.data.local_dir)
        try:
            with self.shared.launching if self.gpu is not None else contextlib.nullcontext():
                deploy(self.ctx, run_id=run_id, with_data=with_data, launching=self.launching,
                       trainer_args=options.to_argv(self.spec.train | params))
        except RemoteError as exc:  # the trainer failed as it started (these options?): the trial's failure
            self._fail(trial, f"failed at launch: {exc}")
            raise _Settled() from exc
        except ConnectionLost:  # cut during the launch: the run may train. The trial keeps its run id
            # and stays RUNNING: the next `orch sweep run` adopts it (follows the run, or launches it
            # when it never started), as it does a killed sweep's. The sweep stops.
            self.ctx.log(f"trial {trial.number}: the connection was lost while launching run {run_id}; "
                         "`orch sweep run` again follows it (or launches it if it never started)")
            raise
        except OrchError as exc:  # the machine's (cannot connect, busy, not ready): the sweep stops
            self._fail(trial, f"not launched: {exc}")
            raise
        self.launched.append(run_id)

    def _follow(self, trial: Any, run_id: str, params: dict[str, Any], reported: set[int],
                pruned_at: int | None = None) -> None:
        """Follow the trial's run to its end (reporting each epoch) and tell Optuna how it went."""
        reporter = _Reporter(trial, self.spec.metric, reported, self.stopping)
        try:
            if pruned_at is None:
                view = self._watched(run_id, reporter)
        except NoSuchRun:  # a killed sweep had chosen the run id but not launched it yet
            self.ctx.log(f"trial {trial.number}: run {run_id} was never launched; launching it now")
            try:
                self._launch(trial, run_id, params)
            except _Settled:
                return
            return self._follow(trial, run_id, params, reported)
        except _Pruned as exc:
            pruned_at = exc.epoch
        except KeyboardInterrupt:  # the second Ctrl-C: the trial's run is stopped too
            self._interrupted(trial, run_id)
            raise
        if pruned_at is not None:
            return self._prune(trial, run_id, pruned_at)
        self._settle(trial, view)

    def _interrupted(self, trial: Any, run_id: str) -> None:
        """The second Ctrl-C: the trial's run stopped (kept), the trial failed."""
        self.ctx.log(f"trial {trial.number}: stopping run {run_id} (Ctrl-C again)")
        with contextlib.suppress(ConfigError):  # not running (not launched yet, or ended): nothing to stop
            stop_runs(self.ctx, [run_id])
        self._fail(trial, "stopped (Ctrl-C)")

    def _watched(self, run_id: str, reporter: _Reporter) -> RunView:
        """The run followed to its end (every recover.poll_seconds), recovered when its machine
        is taken; a watch that gives up leaves the trial RUNNING for the next `orch sweep run`."""
        outcome = watch(self.ctx, run_id, launching=self.launching, show=reporter)
        if outcome.gave_up is not None and not outcome.view.final:
            raise RemoteError(f"run {run_id}: {outcome.gave_up}; `orch sweep run` again follows it")
        reporter(outcome.view)  # the epochs of its last look
        return outcome.view

    def _prune(self, trial: Any, run_id: str, epoch: int) -> None:
        trial.set_user_attr(PRUNED_AT, epoch)  # before the stop: a killed sweep prunes it again, never trains on
        self.ctx.log(f"trial {trial.number}: pruned at epoch {epoch}; stopping run {run_id} (it is kept)")
        try:
            ended = stop_runs(self.ctx, [run_id])
        except ConfigError:  # it ended by itself meanwhile (or is gone): nothing to stop
            ended = []
        if ended:
            trial.set_user_attr(ENDED, ended[0].shown_state)
        self._tell(trial, state=self.optuna.trial.TrialState.PRUNED)

    def _settle(self, trial: Any, view: RunView) -> None:
        trial.set_user_attr(ENDED, view.state)
        value = objective_value(self.spec, view) if view.state == layout.FINISHED else None
        if value is None:
            why = "finished without a value of the objective" if view.state == layout.FINISHED else \
                f"run {view.run_id} {view.state}"
            self.ctx.log(f"trial {trial.number} failed: {why}")
            self._tell(trial, state=self.optuna.trial.TrialState.FAIL)
            return
        self._tell(trial, value)
        best = self.study.best_trial
        self.ctx.log(f"trial {trial.number}: run {view.run_id} {self.spec.objective} {value:.4f} (best so far: "
                     f"trial {best.number}, {best.value:.4f})")

    def _fail(self, trial: Any, why: str) -> None:
        trial.set_user_attr(ENDED, why[:500])
        self._tell(trial, state=self.optuna.trial.TrialState.FAIL)

    def _tell(self, trial: Any, value: float | None = None, state: Any = None) -> None:
        """Optuna told how the trial ended, with its length: the machine's time from the trial's
        ask (its launch) to now, a killed sweep's gap included (the machine ran on meanwhile)."""
        start = trial.datetime_start  # Optuna keeps it naive, in this computer's time
        if start is not None:
            trial.set_user_attr(SECONDS, max(0.0, (datetime.now() - start).total_seconds()))
        self.study.tell(trial, value, state=state)


class _Settled(Exception):
    """A trial that ended at its launch (told failed already): the sweep goes on."""


@contextlib.contextmanager
def _one_sweep_per_study(ctx: Context, spec: SweepSpec) -> Iterator[None]:
    """Two `orch sweep run` of one study on this computer would follow, and tell, the same trials."""
    path = ctx.cfg.base_dir / f".orch-sweep-{spec.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"sweep {spec.name!r} is being run by another `orch sweep run` on this computer "
                            f"(lock {path}); `orch sweep status` shows it") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _interrupts(ctx: Context, *, threaded: bool) -> Iterator[Stopping]:
    """The first Ctrl-C stops launching; the second stops the running trials (one place: at
    once, a launch under way too; several: each place's thread, once its launch is done, at its
    next look); a third exits at once, leaving the trials' runs to train (the next `orch sweep
    run` follows them)."""
    stopping = Stopping()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def handler(_signum: int, _frame: Any) -> None:
        stopping.asked += 1
        if stopping.asked == 1:
            ctx.log("Ctrl-C: no further trial is launched; the running ones go on to their end (Ctrl-C again stops "
                    "them)")
            return
        if stopping.asked == 2:
            ctx.log("Ctrl-C again: the running trials' runs are stopped" + (
                " (Ctrl-C a third time exits at once, leaving them to train)" if threaded else ""))
            if threaded:
                return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stopping
    finally:
        signal.signal(signal.SIGINT, previous)


def check(ctx: Context, spec: SweepSpec) -> float | None:
    """What the spec asks of this config that cannot be done here; the machine's hourly price."""
    cfg = ctx.cfg
    if spec.own_machines and (cfg.target != "ec2" or cfg.ec2.launch is None):
        where = "ec2.launch is not set" if cfg.target == "ec2" else f"target {cfg.target} is one machine"
        raise ConfigError(f"parallel: {spec.parallel} needs instances of the sweep's own, created from ec2.launch "
                          f"(target: ec2), and {where}; parallel: 1 runs the trials one after another (per_gpu: "
                          "true, one per GPU of the machine)")
    if spec.own_machines and cfg.ssh.host:
        raise ConfigError(f"parallel: {spec.parallel}: each of the sweep's own instances is reached at its own "
                          f"address, but ssh.host ({cfg.ssh.host}) names one host for all: leave ssh.host unset (a "
                          "ProxyJump in ssh.config_file still applies)")
    if spec.per_gpu and cfg.target == "ec2" and cfg.ec2.launch is not None and cfg.ec2.launch.spot is not None:
        raise ConfigError("per_gpu on a spot instance is not built (each GPU's trial would recover the one machine "
                          "on its own): use an on-demand instance, or parallel machines without per_gpu")
    if spec.own_machines and not cfg.data.local_dir:
        ctx.log("data.local_dir is unset: the sweep's own instances must find their data in data.remote_dir "
                "already (an AMI or volume that has it); preflight says so if they do not")
    # What recovering a trial's run needs (storage for one-time spot instances), on the machines it runs on.
    machine = _a_machine(ctx, spec)
    check_recoverable(machine)
    price = hourly_price(machine)
    if spec.budget is not None and spec.budget.usd is not None and price is None:
        raise ConfigError(f"budget.usd: no hourly price for target {cfg.target}: set ec2.hourly_price in "
                          "deploy.yaml, or give budget.instance_hours")
    return price


def machine_config(cfg: DeployConfig, spec: SweepSpec, slot: int) -> DeployConfig:
    """The config of a sweep's machine: slot 0 is the config's own; slot k (1..) the sweep's
    instance <ec2.name>-<sweep>-<k>, created from ec2.launch, tagged with the sweep's name, spot or
    on-demand as the spec says, reached at its own address."""
    if slot == 0:
        return cfg
    launch = cfg.ec2.launch
    assert launch is not None  # check(): parallel sweeps need it
    spot = launch.spot if spec.spot is None else (launch.spot or Ec2SpotConfig()) if spec.spot else None
    launch = launch.model_copy(update={"tags": {**launch.tags, SWEEP_TAG: spec.name}, "spot": spot})
    ec2 = cfg.ec2.model_copy(update={"name": f"{cfg.ec2.name or 'orch'}-{spec.name}-{slot}", "instance_id": None,
                                     "launch": launch})
    return cfg.model_copy(update={"ec2": ec2, "ssh": cfg.ssh.model_copy(update={"host": None})})


Place = tuple[int, int | None]  # (machine: 0 the config's, 1.. the sweep's own; its GPU, None: all)


def place_of(trial: Any) -> Place:
    """Where a trial runs. A value no sweep writes (a shared storage is another's input) reads
    as the config's machine, all GPUs."""
    k, gpu = trial.user_attrs.get(MACHINE, 0), trial.user_attrs.get(GPU)
    return (k if type(k) is int and 0 <= k <= MAX_PARALLEL else 0,
            gpu if type(gpu) is int and 0 <= gpu < MAX_PARALLEL else None)


def running_trials(study: Any, place: Place | None = None) -> list[Any]:
    """The trials the study calls RUNNING (at ``place``; None: anywhere), oldest first."""
    running = _optuna().trial.TrialState.RUNNING
    return [t for t in study.get_trials(deepcopy=False, states=(running,)) if place in (None, place_of(t))]


def run(ctx: Context, spec: SweepSpec, *, launching: LaunchOptions = LaunchOptions()) -> SweepStatus:
    """`orch sweep run`: adopt what a killed sweep left, then launch trials (``spec.parallel``
    at once, one thread per place) until the study has ``spec.trials``, the budget would be
    passed, a machine fails, or Ctrl-C; the sweep's own instances then stopped as ``spec.after``
    says; the study as it then stands."""
    price = check(ctx, spec)
    places: list[Place] = ([(0, g) for g in range(spec.parallel)] if spec.per_gpu else
                           [(k, None) for k in range(1, spec.parallel + 1)] if spec.parallel > 1 else [(0, None)])
    with _one_sweep_per_study(ctx, spec), _interrupts(ctx, threaded=len(places) > 1) as stopping:
        study, shared = open_study(ctx, spec, create=True), Shared()

        def at(place: Place) -> Sweep:
            k, gpu = place
            label = " ".join(([f"machine {k}"] if k else []) + ([f"GPU {gpu}"] if gpu is not None else []))
            where = ctx.labelled(label, machine_config(ctx.cfg, spec, k)) if label else ctx
            return Sweep(where, spec, study, launching=launching, stopping=stopping, shared=shared, slot=k, gpu=gpu)

        # Trials a killed sweep left where this one does not run (parallel changed): followed first.
        others = sorted({place_of(t) for t in running_trials(study)} - set(places), key=str)
        if any(k for k, _ in others) and (ctx.cfg.target != "ec2" or ctx.cfg.ec2.launch is None):
            raise ConfigError("trials of this study run on the sweep's own instances, which need ec2.launch "
                              "(target: ec2) to be followed; run it with the config it was started with")
        try:
            interrupted = _each([lambda m=at(p): m.work(price, new=False) for p in others], stopping)
            if not interrupted:
                interrupted = _each([lambda m=at(p): m.work(price) for p in places], stopping)
        except KeyboardInterrupt:  # the third Ctrl-C: out at once
            ctx.log("Ctrl-C a third time: exiting; the trials' runs go on (`orch sweep run` again follows them), "
                    "and the sweep's instances are left as they are (`orch sweep run` again ends them)")
            raise
        if spec.own_machines:  # (check(): on target ec2)
            _after(ctx, spec, study)
        for later in shared.failures[1:]:
            ctx.log(f"also: {later}")
        if interrupted:
            raise KeyboardInterrupt
        if shared.failures:
            raise shared.failures[0]
        why = shared.why or ("Ctrl-C" if stopping.asked else "")
        ctx.log(f"sweep {spec.name}: no further trial ({why})")
        return _status(spec, study, ctx, price, stopped=why, launched=shared.launched)


def _each(works: list[Callable[[], None]], stopping: Stopping) -> bool:
    """The works: one in this (the main) thread, several each in its own thread, waited for
    here, where Ctrl-C arrives (the threads see it through ``stopping``). True: the second Ctrl-C came."""
    if len(works) == 1:
        works[0]()
        return stopping.asked > 1
    threads = [threading.Thread(target=w, name=f"sweep-{i}", daemon=True) for i, w in enumerate(works)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():  # a join with a timeout: signal handlers run in between
            t.join(0.2)
    return stopping.asked > 1


def _after(ctx: Context, spec: SweepSpec, study: Any) -> None:
    """The sweep's own instances once it ends (every live one EC2 has tagged as orch's and this
    sweep's: also those of an earlier `parallel`), stopped, terminated or kept (``spec.after``);
    one a trial is still RUNNING on (its run may train: `orch sweep run` again follows it) is
    left as it is."""
    from orchestrator import ec2 as aws
    from orchestrator.provision import Ec2Provider

    own = _a_machine(ctx, spec)
    p = Ec2Provider(own)
    busy = {machine_config(ctx.cfg, spec, k).ec2.name for k, _ in map(place_of, running_trials(study)) if k}
    try:
        instances = aws.tagged(p.client, {SWEEP_TAG: spec.name, aws.MANAGED_TAG: "true"})
    except OrchError as exc:
        ctx.log(f"could not list the sweep's instances ({exc}): they may still be RUNNING and billed; "
                "`orch sweep run` again ends them")
        return
    for inst in instances:
        if inst.name in busy:
            ctx.log(f"instance {inst.name} ({inst.instance_id}) is left as it is: a trial on it is still under way")
    idle = [i for i in instances if i.name not in busy and (spec.after == "terminate" or i.state not in
                                                            ("stopped", "stopping"))]
    if spec.after == "keep":
        if idle:
            ctx.log(f"the sweep's instances are kept running (after: keep): {', '.join(str(i.name) for i in idle)}")
        return

    def end(inst: aws.Instance) -> None:
        one = Ec2Provider(own.labelled(inst.name or inst.instance_id, own.cfg.model_copy(update={
            "ec2": own.cfg.ec2.model_copy(update={"instance_id": inst.instance_id, "name": None})})))
        try:
            if spec.after == "terminate":
                one.terminate()
            else:
                one.park(inst.instance_id, created=True)  # a one-time spot instance cannot be stopped: terminated
        except OrchError as exc:
            one.ctx.log(f"could not {spec.after} instance {inst.instance_id} ({exc}): it may still be RUNNING and "
                        "billed; `orch sweep run` again ends it")

    with ThreadPoolExecutor(max(1, len(idle))) as pool:
        list(pool.map(end, idle))


def status(ctx: Context, spec: SweepSpec) -> SweepStatus:
    """`orch sweep status`: the study as its storage holds it (the machine is not asked)."""
    return _status(spec, open_study(ctx, spec, create=False), ctx, hourly_price(_a_machine(ctx, spec)))


def _a_machine(ctx: Context, spec: SweepSpec) -> Context:
    """The context of a machine the trials run on (the first; they all have one config but the name)."""
    own = spec.own_machines and ctx.cfg.target == "ec2" and ctx.cfg.ec2.launch is not None
    return ctx.labelled("", machine_config(ctx.cfg, spec, 1 if own else 0))


def _status(spec: SweepSpec, study: Any, ctx: Context, price: float | None, stopped: str | None = None,
            launched: list[str] | None = None) -> SweepStatus:
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    complete = [r for r in rows if r.state == "COMPLETE" and r.value is not None]
    pick = max if spec.maximize else min
    best = pick(complete, key=lambda r: r.value) if complete else None  # type: ignore[arg-type,return-value]
    hours = sum(r.seconds or 0.0 for r in rows) / 3600
    return SweepStatus(spec.name, shown_url(spec.storage_url(ctx.cfg)), spec.objective,
                       "maximize" if spec.maximize else "minimize", spec.trials, rows, best, hours, price, stopped,
                       launched or [])


def _row(t: optuna.trial.FrozenTrial) -> TrialRow:
    seconds = t.user_attrs.get(SECONDS)
    run_id, ended = t.user_attrs.get(RUN_ID), t.user_attrs.get(ENDED)
    return TrialRow(t.number, t.state.name, dict(t.params), t.value, run_id if isinstance(run_id, str) else None,
                    float(seconds) if isinstance(seconds, (int, float)) else None,
                    str(ended) if ended is not None else None)
