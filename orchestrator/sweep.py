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

Target ssh/local: trials one after another on the one machine. Optuna is imported here only,
lazily: ``orch --help`` never loads it, and the trainer never needs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orchestrator.context import Context
from orchestrator.deploy import deploy, new_run_id
from orchestrator.errors import AwsError, BusyError, ConfigError, NoSuchRun, OrchError, RemoteError
from orchestrator.monitor import RunView
from orchestrator.recover import check_recoverable, watch
from orchestrator.requests import LaunchOptions
from orchestrator.runs import stop as stop_runs
from orchestrator.sweepspec import SweepSpec
from trainer.contract import layout, options

if TYPE_CHECKING:
    import optuna

# The trial's user attributes orch keeps (the study is the state: nothing else is).
RUN_ID = "run_id"  # set before the run is launched
SECONDS = "seconds"  # the trial's length, launch to end, as this computer saw it (what a budget counts)
ENDED = "ended"  # how its run ended, or why the trial failed
PRUNED_AT = "pruned_at"  # the epoch the pruner stopped it at (set before the run is stopped)


@dataclass
class Stopping:
    """Ctrl-C during a sweep: the first stops launching, the second stops the running trial."""

    asked: int = 0


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
    sampler, pruner = optuna.samplers.TPESampler(seed=spec.seed), _pruner(spec)
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
        study.sampler = optuna.samplers.TPESampler(seed=spec.seed + len(study.get_trials(deepcopy=False)))
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
    from orchestrator.provision import provider

    try:
        inst = provider(ctx).status()
    except (AwsError, ConfigError):
        return None
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

    def __init__(self, trial: Any, metric: str, reported: set[int]) -> None:
        self.trial, self.metric, self.reported = trial, metric, set(reported)

    def __call__(self, view: RunView) -> None:
        for epoch in view.history:  # one refresh may bring several epochs: each judged as it came
            value = getattr(epoch, self.metric)
            if epoch.epoch in self.reported or value is None or not math.isfinite(value):
                continue
            self.trial.report(value, step=epoch.epoch)
            self.reported.add(epoch.epoch)
            if view.alive and not view.final and self.trial.should_prune():
                raise _Pruned(epoch.epoch)


class Sweep:
    """One `orch sweep run`: the study, and what it launched."""

    def __init__(self, ctx: Context, spec: SweepSpec, study: Any, *, launching: LaunchOptions,
                 stopping: Stopping) -> None:
        self.ctx, self.spec, self.study = ctx, spec, study
        self.launching, self.stopping = launching, stopping
        self.launched: list[str] = []
        self.optuna = _optuna()

    def adopt(self) -> None:
        """Settle the trials a killed `orch sweep run` left RUNNING (oldest first)."""
        running = self.optuna.trial.TrialState.RUNNING
        for frozen in self.study.get_trials(deepcopy=False, states=(running,)):
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
        budget = self.spec.budget
        if budget is None:
            return None
        lengths = [t.user_attrs[SECONDS] for t in trials if isinstance(t.user_attrs.get(SECONDS), (int, float))]
        spent = sum(lengths) / 3600
        expected = spent / len(lengths) if lengths else 0.0  # the next trial, at the mean length so far
        if budget.instance_hours is not None and spent + expected > budget.instance_hours:
            return (f"budget: {spent:.3f} instance-hours spent, the next trial (about {expected:.3f} h) would pass "
                    f"{budget.instance_hours:g}")
        if budget.usd is not None and price is not None and (spent + expected) * price > budget.usd:
            return (f"budget: ${spent * price:.2f} spent, the next trial (about ${expected * price:.2f}) would pass "
                    f"${budget.usd:g}")
        return None

    def launch_one(self) -> None:
        """Ask Optuna for a trial, launch its run, follow it to its end, tell the result."""
        trial = self.study.ask()
        params = suggest(trial, self.spec)
        run_id = new_run_id()
        trial.set_user_attr(RUN_ID, run_id)  # before the launch: a killed sweep finds the run again
        try:
            self._launch(trial, run_id, params)
        except KeyboardInterrupt:  # the second Ctrl-C came while it launched
            self._interrupted(trial, run_id)
            raise
        self._follow(trial, run_id, params, set())

    def _launch(self, trial: Any, run_id: str, params: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.ctx.log(f"trial {trial.number}: launching run {run_id} ({shown})")
        try:
            deploy(self.ctx, run_id=run_id, launching=self.launching,
                   trainer_args=options.to_argv(self.spec.train | params))
        except RemoteError as exc:  # the trainer failed as it started (these options?): the trial's failure
            self._fail(trial, f"failed at launch: {exc}")
            raise _Settled() from exc
        except OrchError as exc:  # the machine's (cannot connect, busy, not ready): the sweep stops
            self._fail(trial, f"not launched: {exc}")
            raise
        self.launched.append(run_id)

    def _follow(self, trial: Any, run_id: str, params: dict[str, Any], reported: set[int],
                pruned_at: int | None = None) -> None:
        """Follow the trial's run to its end (reporting each epoch) and tell Optuna how it went."""
        reporter = _Reporter(trial, self.spec.metric, reported)
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
def _interrupts(ctx: Context) -> Iterator[Stopping]:
    """The first Ctrl-C stops launching; the second interrupts (the running trial is stopped)."""
    stopping = Stopping()
    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return

    def handler(_signum: int, _frame: Any) -> None:
        stopping.asked += 1
        if stopping.asked > 1:
            raise KeyboardInterrupt
        ctx.log("Ctrl-C: no further trial is launched; the running one goes on to its end (Ctrl-C again stops it)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stopping
    finally:
        signal.signal(signal.SIGINT, previous)


def check(ctx: Context, spec: SweepSpec) -> float | None:
    """What the spec asks of this config that cannot be done here; the machine's hourly price."""
    if spec.parallel > 1:
        raise ConfigError(f"parallel: {spec.parallel}: several machines at once are not built yet; target "
                          f"{ctx.cfg.target} runs trials one after another (parallel: 1)")
    check_recoverable(ctx)  # what recovering a trial's run needs (storage for one-time spot instances)
    price = hourly_price(ctx)
    if spec.budget is not None and spec.budget.usd is not None and price is None:
        raise ConfigError(f"budget.usd: no hourly price for target {ctx.cfg.target}: set ec2.hourly_price in "
                          "deploy.yaml, or give budget.instance_hours")
    return price


def run(ctx: Context, spec: SweepSpec, *, launching: LaunchOptions = LaunchOptions()) -> SweepStatus:
    """`orch sweep run`: adopt what a killed sweep left, then launch trials one after another
    until the study has ``spec.trials``, the budget would be passed, or Ctrl-C; the study as it
    then stands."""
    price = check(ctx, spec)
    with _one_sweep_per_study(ctx, spec), _interrupts(ctx) as stopping:
        sweep = Sweep(ctx, spec, open_study(ctx, spec, create=True), launching=launching, stopping=stopping)
        sweep.adopt()
        while (why := sweep.why_stop(price)) is None:
            with contextlib.suppress(_Settled):
                sweep.launch_one()
        ctx.log(f"sweep {spec.name}: no further trial ({why})")
        return _status(spec, sweep.study, ctx, price, stopped=why, launched=sweep.launched)


def status(ctx: Context, spec: SweepSpec) -> SweepStatus:
    """`orch sweep status`: the study as its storage holds it (the machine is not asked)."""
    return _status(spec, open_study(ctx, spec, create=False), ctx, hourly_price(ctx))


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
