"""`orch sweep` without a trainer: what stops launching (the trials, the budget in hours and
in USD, Ctrl-C), the parameters Optuna's ask gives, a trial a killed sweep left without a run,
one sweep per study, and its errors as one line with exit 2 (Optuna's real SQLite storage)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import DeployConfig
from orchestrator.context import Context, Output
from orchestrator.requests import LaunchOptions
from orchestrator.sweep import Stopping, Sweep, open_study, shown_url, suggest
from orchestrator.sweepspec import SweepSpec
from trainer.contract import options


def spec(**changes: Any) -> SweepSpec:
    return SweepSpec.model_validate({"name": "s", "trials": 3, "space": {"learning_rate": {"low": 1e-4, "high": 1e-2,
                                     "log": True}}} | changes)


def context(tmp_path: Path, **config: Any) -> Context:
    return Context(DeployConfig.model_validate({"target": "local", "base_dir": tmp_path} | config))


def finished(study: optuna.Study, seconds: float) -> None:
    """A trial whose run took ``seconds``, as the study records one."""
    study.add_trial(optuna.trial.create_trial(
        params={"learning_rate": 1e-3}, value=0.5, user_attrs={"run_id": "r", "seconds": seconds},
        distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}))


def sweep(tmp_path: Path, s: SweepSpec, stopping: Stopping | None = None) -> Sweep:
    ctx = context(tmp_path)
    return Sweep(ctx, s, open_study(ctx, s, create=True), launching=LaunchOptions(), stopping=stopping or Stopping())


def test_what_stops_launching(tmp_path: Path) -> None:
    hours = sweep(tmp_path, spec(name="hours", budget={"instance_hours": 1.5}))
    assert hours.why_stop(None) is None  # nothing spent, no length known: the first trial goes
    finished(hours.study, 3600)
    assert hours.why_stop(None) == ("budget: 1.000 instance-hours spent, the next trial (about 1.000 h) would pass "
                                    "1.5")
    usd = sweep(tmp_path, spec(name="usd", budget={"usd": 5}))
    finished(usd.study, 1800)
    assert usd.why_stop(4.0) is None  # $2 spent, the next about $2: $4 of 5
    finished(usd.study, 1800)
    assert usd.why_stop(4.0) == "budget: $4.00 spent, the next trial (about $2.00) would pass $5"
    count = sweep(tmp_path, spec(name="count", trials=1))
    finished(count.study, 1)
    assert count.why_stop(None) == "the study has its 1 trials"
    assert sweep(tmp_path, spec(name="ctrl-c"), Stopping(asked=1)).why_stop(None) == "Ctrl-C"


def test_the_parameters_asked_are_the_options_types_within_the_space(tmp_path: Path) -> None:
    s = spec(name="kinds", seed=1, space={"hidden": {"low": 8, "high": 64, "log": True},
                                          "batch_size": {"low": 8, "high": 32, "step": 8},
                                          "dropout": {"low": 0.0, "high": 0.5}, "split": {"choices": ["random"]},
                                          "class_weights": {"choices": [False]}})
    study = open_study(context(tmp_path), s, create=True)
    for _ in range(5):
        params = suggest(study.ask(), s)
        assert options.validate(params) == params  # the trainer takes them as they are
        assert isinstance(params["hidden"], int) and 8 <= params["hidden"] <= 64
        assert params["batch_size"] in (8, 16, 24, 32) and 0.0 <= params["dropout"] <= 0.5
        assert params["split"] == "random" and params["class_weights"] is False
        assert options.to_argv({"class_weights": params["class_weights"]}) == ["--no-class-weights"]


def test_a_trial_a_killed_sweep_left_without_a_run_is_failed_not_launched(tmp_path: Path) -> None:
    s = spec(name="killed")
    open_study(context(tmp_path), s, create=True).ask()  # killed between Optuna's ask and the run id
    again = sweep(tmp_path, s)
    again.adopt()
    [trial] = again.study.get_trials()
    assert trial.state.name == "FAIL" and "never launched" in trial.user_attrs["ended"] and again.launched == []


def test_a_continued_study_must_keep_its_objective_and_direction(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    open_study(ctx, spec(name="kept"), create=True)
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="was started to maximize, the spec says minimize"):
        open_study(ctx, spec(name="kept", objective="val_loss"), create=True)
    with pytest.raises(ConfigError, match="was started with objective best_val_accuracy, the spec says val_accuracy"):
        open_study(ctx, spec(name="kept", objective="val_accuracy"), create=True)
    assert shown_url("postgresql://me:secret@db.example/sweeps") == "postgresql://***@db.example/sweeps"


def cli(tmp_path: Path, *args: str, **spec_changes: Any) -> tuple[int, str]:
    (tmp_path / "deploy.yaml").write_text(yaml.safe_dump({"target": "local", "remote": {"root": str(tmp_path / "r")}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"name": "cli", "trials": 2, "space": {
        "learning_rate": {"low": 1e-4, "high": 1e-2}}} | spec_changes))
    output = Output.captured()
    code = main(["sweep", *args, str(tmp_path / "sweep.yaml"), "-c", str(tmp_path / "deploy.yaml")], output)
    return code, output.err.file.getvalue()


def test_errors_are_one_line_with_their_exit_code_and_nothing_launched(tmp_path: Path) -> None:
    code, err = cli(tmp_path, "run", space={"learning_rate": {"low": 1e-4, "high": 11}})
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("orch: error: ") and "space.learning_rate.high: must be a number > 0 and <= 10" in err
    code, err = cli(tmp_path, "run", budget={"usd": 3})
    assert code == 2 and "budget.usd: no hourly price for target local: set ec2.hourly_price" in err
    code, err = cli(tmp_path, "run", parallel=2)
    assert code == 2 and "parallel: 2: several machines at once are not built yet" in err
    code, err = cli(tmp_path, "status")
    assert code == 2 and "no study 'cli' in sqlite:///" in err and "`orch sweep run` starts it" in err
    fd = os.open(tmp_path / ".orch-sweep-cli.lock", os.O_RDWR | os.O_CREAT)  # another `orch sweep run` holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, err = cli(tmp_path, "run")
    finally:
        os.close(fd)
    assert code == 6 and "sweep 'cli' is being run by another `orch sweep run` on this computer" in err
    assert not (tmp_path / "r").exists()  # the machine was never asked anything
