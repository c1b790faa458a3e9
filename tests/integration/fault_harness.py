"""The fault-injection harness: train a tiny model while SIGKILLing the trainer at many moments,
restarting the same command after each kill, and check the run directory's guarantees
(trainer/contract/layout.py) after every kill and at the end of every run.

Kills come at the trainer's failpoints (trainer/machine/faults.py: between any two file operations of
the commit sequence, of the publishing of derived files and of the start-up repair; the n-th
time a point is reached, so at various epochs) and at random moments. A failpoint kill is
planned within the times the start surely reaches its point (counted on the uninterrupted
run), so each one comes: no start is spent on a run that finishes unkilled. One harness for
tests/integration/test_faults.py (a modest number of kills) and bench/bench_faults.py
(hundreds).

After every kill:
- ``sha256sum -c MANIFEST.sha256`` passes (and a manifest exists once an epoch is committed);
- the committed state holds epochs 1..n once each, each of them exactly the uninterrupted run's
  (every metrics field but the wall-clock ones: loss, accuracy, val_loss, val_accuracy, lr), its
  best is the max recorded val accuracy, and evaluating its best file on the validation split
  gives exactly that accuracy; epoch and best never go back;
- metrics.jsonl is the state's history, or lacks only its newest epoch (killed in between);
- a copy of the directory, repaired as a restart repairs it, has best.weights.h5 = the state's
  best, a manifest that verifies, metrics = history, no temp file, no epoch file the state
  does not name.
At the end of a run: finished, metrics.jsonl is the uninterrupted run's (but wall-clock fields),
best.weights.h5 evaluates to the max val accuracy, the manifest verifies, no temp files.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.trainer_proc import metrics, run_trainer, start_trainer
from trainer.contract import layout
from trainer.machine import faults
from trainer.ml import runstate
from trainer.ml.runstate import RunState
from trainer.ml.tbevents import read_steps

_RANDOM_SHARE = 0.3  # of the kills, the share at random moments rather than at a failpoint


@dataclass(frozen=True)
class Scenario:
    """The one training command every attempt runs (tiny SYNTHETIC data, tiny model)."""

    data: Path
    epochs: int = 12
    seed: int = 1

    def argv(self, run: Path) -> list[str]:
        return ["train", "--data-dir", str(self.data), "--run-dir", str(run), "--epochs", str(self.epochs),
                "--learning-rate", "0.003", "--warmup-epochs", "2", "--hidden", "16", "--attention", "8",
                "--batch-size", "16", "--seed", str(self.seed)]


def make_data(root: Path) -> Path:
    from trainer.ml.synth import synth

    synth(root, n=240, dim=16, seed=5, min_frames=6, max_frames=20)
    return root


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run: its metrics (but wall-clock fields) and how long its phases take."""

    rows: list[dict[str, Any]]
    first_epoch_seconds: float  # tracing the model makes the first epoch of every start slower
    epoch_seconds: float
    seconds: float
    steps: int  # batches per epoch
    points: tuple[str, ...] = ()  # the failpoints it reached, in order

    def sure_hits(self, point: str, committed: int) -> int:
        """How many times a start that continues from ``committed`` epochs surely reaches
        ``point``: at least as often as the uninterrupted run did from the first batch of
        epoch ``committed + 1`` on (the same training, bit for bit; the start's own repair
        and publishing only add to it). A kill planned within this count always comes."""
        done = [i for i, name in enumerate(self.points) if name == "commit:done"]
        after = done[min(committed, len(done)) - 1] if committed else -1
        first = next((i for i in range(after + 1, len(self.points)) if self.points[i] == "train:batch"),
                     len(self.points))
        return self.points[first:].count(point)


def reference_run(scenario: Scenario, run: Path) -> Reference:
    start = time.monotonic()
    log = run.parent / f"{run.name}.points"
    run_trainer(*scenario.argv(run), env={faults.LOG_ENV: str(log)})
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, scenario.epochs + 1))
    typical = sorted(r["seconds"] for r in rows)[len(rows) // 2]
    steps = json.loads((run / layout.HEARTBEAT).read_text())["batches"]
    return Reference(untimed(rows), rows[0]["seconds"], typical, time.monotonic() - start, steps,
                     tuple(log.read_text().split()))


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows without their wall-clock fields: what two runs of one command share exactly."""
    return [{k: v for k, v in row.items() if k not in layout.TIMING_KEYS} for row in rows]


@dataclass(frozen=True)
class Plan:
    """How one attempt ends: at the n-th time a failpoint is reached, or ``delay`` seconds
    after training starts (``from_start``: after the process starts)."""

    point: str | None = None
    delay: float | None = None
    from_start: bool = False

    def __str__(self) -> str:
        if self.point:
            return f"at {self.point}"
        return f"{self.delay:.2f} s after {'start' if self.from_start else 'training began'}"


@dataclass
class Tally:
    kills: int = 0
    at_points: int = 0
    at_random: int = 0
    finished_runs: int = 0
    points: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.kills} kills, {len(self.violations)} violations"

    def detail(self) -> str:
        return (f"{self.at_points} at failpoints ({len(self.points)} of {len(faults.POINTS)} points), "
                f"{self.at_random} at random moments; {self.finished_runs} runs finished")


def kill_loop(scenario: Scenario, reference: Reference, judge: Judge, workdir: Path, kills: int,
              seed: int = 0, log: Any = print) -> Tally:
    """Kill and restart until ``kills`` kills happened (a run that finishes meanwhile is
    checked and a new one started), then let the last run finish and check it."""
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    points = _Cycle(rng)
    tally = Tally()
    run: Path | None = None
    while tally.kills < kills:
        run = run or workdir / f"run-{tally.finished_runs}"
        plan = _plan(rng, points, scenario, reference, run)
        rc, harness_killed = _attempt(scenario, run, plan)
        if rc == -signal.SIGKILL:
            tally.kills += 1
            if harness_killed:
                tally.at_random += 1
            else:
                tally.at_points += 1
                name = str(plan.point).split("@")[0]
                tally.points[name] = tally.points.get(name, 0) + 1
            found = judge.after_kill(run)
            tally.violations += [f"{run.name}, kill {tally.kills} ({plan}): {v}" for v in found]
            log(f"kill {tally.kills:>3} {plan}: epoch {_committed(run)}" + (f", {len(found)} VIOLATIONS" if found else ""))
        else:
            if plan.point:  # planned within what the start surely reaches (Reference.sure_hits)
                tally.violations.append(f"{run.name}: the kill {plan} never came (exit {rc})")
            tally.violations += _ended(judge, run, rc, plan)
            tally.finished_runs += 1
            run = None
    if run is not None:
        rc, _ = _attempt(scenario, run, Plan())
        tally.violations += _ended(judge, run, rc, Plan())
        tally.finished_runs += 1
    return tally


def _ended(judge: Judge, run: Path, rc: int, plan: Plan) -> list[str]:
    if rc != 0:
        return [f"{run.name} ({plan}): trainer exited {rc}: {_tail(run)}"]
    return [f"{run.name} at the end: {v}" for v in judge.at_end(run)]


class _Cycle:
    """The failpoints in a shuffled order, again and again: few kills still cover many points.
    A point this start cannot reach waits in the queue for a start that can."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.queue = rng, []

    def next(self, hits: Callable[[str], int]) -> tuple[str, int]:
        """The next point this start surely reaches, and how many times (``hits``)."""
        while True:
            for i in range(len(self.queue) - 1, -1, -1):
                n = hits(self.queue[i])
                if n > 0:
                    return self.queue.pop(i), n
            fresh = [name for name in faults.POINTS if name not in self.queue]  # repair:begin: always reached
            self.rng.shuffle(fresh)
            self.queue = fresh + self.queue


def _plan(rng: random.Random, points: _Cycle, scenario: Scenario, reference: Reference, run: Path) -> Plan:
    committed = _committed(run)
    remaining = scenario.epochs - committed
    if rng.random() < _RANDOM_SHARE:
        if rng.random() < 0.2:  # now and then during start-up (repair, data, TensorFlow)
            startup = reference.seconds - reference.first_epoch_seconds - scenario.epochs * reference.epoch_seconds
            return Plan(delay=rng.uniform(0, max(startup, 0.5)), from_start=True)
        return Plan(delay=rng.uniform(0, reference.first_epoch_seconds + remaining * reference.epoch_seconds))
    has_temps = any(layout.is_temp(p.name) for p in _files(run))

    def hits(name: str) -> int:
        if name == "repair:begin":
            return 1
        if name == "repair:temp-removed":  # reached only when a kill left temp files
            return int(has_temps)
        return reference.sure_hits(name, committed)

    name, n = points.next(hits)
    return Plan(point=f"{name}@{rng.randint(1, n)}")


def _attempt(scenario: Scenario, run: Path, plan: Plan) -> tuple[int, bool]:
    """Run the command once; (exit code, whether the harness sent the SIGKILL)."""
    env = {faults.ENV: plan.point} if plan.point else {}
    proc = start_trainer(*scenario.argv(run), log=run.parent / f"{run.name}.log", env=env, append=True)
    if plan.delay is None:
        return proc.wait(), False
    if not plan.from_start:  # this process's status (not the one a killed process left)
        while proc.poll() is None and (_status(run).get("pid"), _status(run).get("phase")) != (proc.pid, "training"):
            time.sleep(0.02)
    try:
        proc.wait(timeout=plan.delay)
        return proc.returncode, False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(), True


class Judge:
    """Checks the guarantees; evaluates weights files on a run's validation split, in-process."""

    def __init__(self, scenario: Scenario, reference: Reference, scratch: Path) -> None:
        self.scenario, self.reference, self.scratch = scenario, reference, scratch
        self._seen: dict[Path, tuple[int, float]] = {}
        self._evaluators: dict[Path, Any] = {}
        self._dataset: Any = None

    # ---- after a kill
    def after_kill(self, run: Path) -> list[str]:
        problems = self._manifest(run, required=(run / layout.STATE).exists())
        try:
            state = runstate.read(run)
        except Exception as exc:
            return [*problems, f"committed state unreadable: {exc}"]
        if state is None:
            return problems
        problems += self._history([dict(r) for r in state.history], "state history")
        problems += self._best(run, state)
        problems += self._progress(run, state)
        rows = metrics(run)
        if rows != list(state.history) and rows != list(state.history[:-1]):
            problems.append(f"metrics.jsonl has epochs {[r['epoch'] for r in rows]}, the state {state.epoch}")
        return problems + self._repaired(run, state)

    def _history(self, rows: list[dict[str, Any]], what: str) -> list[str]:
        epochs = [r["epoch"] for r in rows]
        if epochs != list(range(1, len(rows) + 1)):
            return [f"{what}: epochs {epochs}, not 1..{len(rows)} once each"]
        expected = self.reference.rows[: len(rows)]
        differ = [(got, want) for got, want in zip(untimed(rows), expected, strict=True) if got != want]
        if differ:
            return [f"{what}: epoch {differ[0][1]['epoch']} is {differ[0][0]}, the uninterrupted run's {differ[0][1]}"]
        return []

    def _best(self, run: Path, state: RunState) -> list[str]:
        recorded = max((r["val_accuracy"] for r in state.history), default=None)
        if state.best_val_accuracy != recorded or state.best is None or state.best_epoch is None:
            return [f"state best {state.best_val_accuracy} (epoch {state.best_epoch}) is not the max recorded "
                    f"val accuracy {recorded}"]
        if state.best.file != layout.epoch_weights(state.best_epoch):
            return [f"state best names {state.best.file}, not epoch {state.best_epoch}'s file"]
        measured = self.accuracy(run, run / state.best.file)
        if abs(measured - recorded) > 1e-6:
            return [f"the state's best file evaluates to {measured}, the max recorded val accuracy is {recorded}"]
        return []

    def _progress(self, run: Path, state: RunState) -> list[str]:
        before = self._seen.get(run, (0, float("-inf")))
        best = state.best_val_accuracy if state.best_val_accuracy is not None else float("-inf")
        self._seen[run] = (state.epoch, best)
        if state.epoch < before[0] or best < before[1]:
            return [f"went back: epoch {before[0]} -> {state.epoch}, best {before[1]} -> {best}"]
        return []

    def _repaired(self, run: Path, state: RunState) -> list[str]:
        """What a restart makes of the directory, on a copy (the real one restarts untouched)."""
        from trainer.ml.rundir import RunDir

        copy = self.scratch / "repaired"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns(layout.TENSORBOARD_DIR))
        final = _status(copy).get("state") in layout.FINAL_STATES
        RunDir(copy, state).repair(None, final=final)
        problems = self._manifest(copy, required=True)
        best = copy / layout.BEST_WEIGHTS
        if state.best is not None and layout.parse_manifest((copy / layout.MANIFEST).read_text()).get(
                layout.BEST_WEIGHTS) != state.best.sha256:
            problems.append("after repair, the manifest does not list best.weights.h5 with the state's sha256")
        if best.is_file() and state.best is not None and best.read_bytes() != (copy / state.best.file).read_bytes():
            problems.append("after repair, best.weights.h5 is not the state's best file")
        if metrics(copy) != list(state.history):
            problems.append("after repair, metrics.jsonl is not the state's history")
        return problems + [f"after repair: {p}" for p in _leftovers(copy, state)]

    # ---- at the end of a run
    def at_end(self, run: Path) -> list[str]:
        problems = self._manifest(run, required=True)
        status = _status(run)
        rows = metrics(run)
        if status.get("state") != layout.FINISHED:
            problems.append(f"state {status.get('state')}, not finished")
        if len(rows) != self.scenario.epochs:
            problems.append(f"{len(rows)} metrics lines, not {self.scenario.epochs}")
        problems += self._history(rows, "metrics.jsonl")
        recorded = max(r["val_accuracy"] for r in rows) if rows else None
        measured = self.accuracy(run, run / layout.BEST_WEIGHTS) if rows else None
        if recorded is None or measured is None or abs(measured - recorded) > 1e-6:
            problems.append(f"best.weights.h5 evaluates to {measured}, the max recorded val accuracy is {recorded}")
        listed = set(layout.parse_manifest((run / layout.MANIFEST).read_text())) if (run / layout.MANIFEST).exists() else set()
        if not {layout.BEST_WEIGHTS, layout.STATUS, layout.METRICS, *layout.TENSORBOARD_FILES} <= listed:
            problems.append(f"the finished run's manifest lists only {sorted(listed)}")
        for rel in layout.TENSORBOARD_FILES:  # one event per epoch, none twice, none missing
            data = (run / rel).read_bytes() if (run / rel).is_file() else b""
            steps = [step for _end, step in read_steps(data) if step is not None]
            if steps != list(range(1, self.scenario.epochs + 1)):
                problems.append(f"{rel} holds the steps {steps}, not 1..{self.scenario.epochs}")
        state = runstate.read(run)
        return problems + (_leftovers(run, state) if state else ["no committed state"])

    def _manifest(self, run: Path, required: bool) -> list[str]:
        if not (run / layout.MANIFEST).exists():
            return ["no MANIFEST.sha256 although an epoch is committed"] if required else []
        check = subprocess.run(["sha256sum", "--quiet", "-c", layout.MANIFEST], cwd=run, capture_output=True, text=True)
        return [] if check.returncode == 0 else [f"sha256sum -c failed: {(check.stdout + check.stderr).strip()}"]

    # ---- evaluation
    def accuracy(self, run: Path, weights: Path) -> float:
        """Accuracy of ``weights`` on ``run``'s validation split (as the trainer's evaluate scores it)."""
        from trainer.ml.evaluate import predict_probabilities

        model, sequences, labels = self._evaluator(run)
        model.load_weights(weights)
        probs = predict_probabilities(model, sequences)
        return float((probs.argmax(axis=1) == labels).mean())

    def _evaluator(self, run: Path) -> Any:
        if run not in self._evaluators:
            from trainer.ml.config import TrainConfig
            from trainer.ml.data import load_dataset
            from trainer.ml.layerselect import take
            from trainer.ml.model import build_model
            from trainer.ml.speakers import run_normalization
            from trainer.ml.stats import load_stats

            doc = json.loads((run / layout.RUN_JSON).read_text())
            cfg, shape = TrainConfig.from_json(doc["config"]), tuple(doc["feature_shape"])
            if self._dataset is None:
                self._dataset = load_dataset(self.scenario.data, cfg.classes)
            ds = dataclasses.replace(self._dataset)  # the run's normalization replaces its frames only
            take(ds, cfg.layers)
            run_normalization(cfg, run, shape).apply_dataset(ds)
            index = ds.index_of()
            val = [index[rel] for rel in json.loads((run / layout.stats_path(layout.SPLIT_JSON)).read_text())["validation"]]
            model = build_model(cfg.architecture, load_stats(run / layout.STATS_DIR, shape), len(cfg.classes))
            self._evaluators[run] = (model, [ds.sequence(i) for i in val], ds.label_ids()[val])
        return self._evaluators[run]


def _leftovers(run: Path, state: RunState) -> list[str]:
    problems = [f"temp file left: {p.relative_to(run)}" for p in _files(run) if layout.is_temp(p.name)]
    epochs = {f"{layout.CHECKPOINTS_DIR}/{p.name}" for p in _files(run / layout.CHECKPOINTS_DIR)
              if layout.epoch_of(p.name) is not None}
    if epochs != state.files():
        problems.append(f"epoch files {sorted(epochs)}, the state names {sorted(state.files())}")
    return problems


def _files(run: Path) -> list[Path]:
    return [p for d in (run, run / layout.CHECKPOINTS_DIR, run / layout.STATS_DIR) if d.is_dir() for p in d.iterdir()]


def _committed(run: Path) -> int:
    try:
        return int(json.loads((run / layout.STATE).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _status(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / layout.STATUS).read_text())
    except (OSError, ValueError):
        return {}


def _tail(run: Path) -> str:
    try:
        return " | ".join((run.parent / f"{run.name}.log").read_text(errors="replace").splitlines()[-5:])
    except OSError:
        return "(no log)"
