"""`orch sweep run` on the local target with Optuna's real SQLite storage and the real trainer
on tiny synthetic data: a 4-trial sweep interrupted (Ctrl-C once) in its first trial, twice in
its second, killed in its third and run again continues its study without launching a trial
twice; a pruned trial's run is stopped and kept; the budget stops launching; a trial whose launch
lost its connection is followed by the next sweep run, not failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import run_orch, write_config
from tests.integration.trainer_proc import ROOT, metrics, status, trainer_env
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
TINY = {"batch_size": 8, "hidden": 8, "attention": 4, "seed": 1, "warmup_epochs": 0}


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep-features")
    synth(root, n=60, dim=8, seed=8, min_frames=4, max_frames=6)
    return root


def config(tmp_path: Path, features: Path) -> Path:
    return write_config(tmp_path / "deploy.yaml", target="local",
                        remote={"root": str(tmp_path / "remote"), "python": sys.executable},
                        data={"remote_dir": str(features)}, train={**TINY, "cache_dir": str(tmp_path / "cache")},
                        recover={"poll_seconds": 1})  # how often a trial's run is looked at


def spec_file(tmp_path: Path, **spec: object) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study(tmp_path: Path, name: str):  # noqa: ANN201
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'sweeps.db'}")


def wait_for(check, what: str, proc: subprocess.Popen) -> str:  # noqa: ANN001
    deadline = time.monotonic() + 240  # a safety net for a hang, not a margin: the loop ends on the event
    while not (found := check()):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"orch sweep run exited ({proc.returncode}) before {what}\n{out[-2000:]}\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.1)
    return found


def trial_training(tmp_path: Path, name: str, number: int) -> str | None:
    """Trial ``number``'s run id once its trainer runs (the study and the run folder say so)."""
    import optuna

    try:
        trials = study(tmp_path, name).get_trials(deepcopy=False)
    except (KeyError, optuna.exceptions.StorageInternalError):
        return None
    run_id = trials[number].user_attrs.get("run_id") if len(trials) > number else None
    folder = tmp_path / "remote" / "runs" / str(run_id) / "status.json"
    return run_id if run_id and folder.is_file() and status(folder.parent)["state"] == "running" else None


def sweep_run(spec: Path, cfg: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", "run", str(spec), "-c", str(cfg), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env(), cwd=ROOT)


def test_a_sweep_interrupted_and_killed_continues_its_study_launching_no_trial_twice(tmp_path: Path,
                                                                                     features: Path) -> None:
    cfg = config(tmp_path, features)
    spec = spec_file(tmp_path, name="e2e", trials=4, seed=3, objective="val_loss", train={"epochs": 2},
                     space={"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
                            "head_dropout": {"choices": [0.0, 0.3]}})
    # Ctrl-C once during trial 0: no further trial is launched, trial 0 runs to its end
    first = sweep_run(spec, cfg, "--json")
    try:
        wait_for(lambda: trial_training(tmp_path, "e2e", 0), "trial 0 training", first)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=240)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 130 and json.loads(out)["stopped"] == "Ctrl-C", err
    assert "Ctrl-C: no further trial is launched" in err
    assert [t.state.name for t in study(tmp_path, "e2e").get_trials()] == ["COMPLETE"]
    # Ctrl-C twice during trial 1: its run is stopped (and kept), the trial failed
    second = sweep_run(spec, cfg)
    try:
        stopped = wait_for(lambda: trial_training(tmp_path, "e2e", 1), "trial 1 training", second)
        second.send_signal(signal.SIGINT)
        assert second.stderr is not None
        while "Ctrl-C: no further trial is launched" not in (line := second.stderr.readline()):
            assert line, "orch sweep run ended before it took the first Ctrl-C"
        second.send_signal(signal.SIGINT)
        _, err = second.communicate(timeout=240)
    finally:
        second.kill()
        second.wait()
    assert second.returncode == 130 and f"trial 1: stopping run {stopped} (Ctrl-C again)" in err, err
    assert status(tmp_path / "remote" / "runs" / stopped)["state"] == "stopped"
    assert study(tmp_path, "e2e").get_trials()[1].user_attrs["ended"] == "stopped (Ctrl-C)"
    # killed (SIGKILL: no clean-up at all) during trial 2: the study is the state
    third = sweep_run(spec, cfg)
    try:
        adopted = wait_for(lambda: trial_training(tmp_path, "e2e", 2), "trial 2 training", third)
        third.send_signal(signal.SIGKILL)
        third.wait()
    finally:
        third.kill()
        third.communicate()
    assert [t.state.name for t in study(tmp_path, "e2e").get_trials()] == ["COMPLETE", "FAIL", "RUNNING"]

    done = run_orch("sweep", "run", spec, "-c", cfg, "--json")
    assert done.returncode == 0, done.stderr
    assert f"trial 2: adopting run {adopted}" in done.stderr
    trials = study(tmp_path, "e2e").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    run_ids = [t.user_attrs["run_id"] for t in trials]
    assert run_ids[1:3] == [stopped, adopted] and len(set(run_ids)) == 4
    assert sorted(p.name for p in (tmp_path / "remote" / "runs").iterdir()) == sorted(run_ids)  # none twice
    assert json.loads(done.stdout)["launched"] == run_ids[3:]  # the adopted trial was followed, not launched
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    for t in complete:
        run_id = t.user_attrs["run_id"]
        run = tmp_path / "remote" / "runs" / run_id
        lines = metrics(run)
        assert t.value == min(m["val_loss"] for m in lines)  # the run's recorded best, told
        assert t.intermediate_values == {m["epoch"]: m["val_loss"] for m in lines}  # every epoch reported
        config_of = json.loads((run / "run.json").read_text())["config"]
        assert config_of["learning_rate"] == pytest.approx(t.params["learning_rate"])
        assert config_of["head_dropout"] == t.params["head_dropout"] and config_of["epochs"] == 2
        st = status(run)
        trained = (datetime.fromisoformat(st["updated_at"]) - datetime.fromisoformat(json.loads(
            (run / "run.json").read_text())["started_at"])).total_seconds()
        assert st["state"] == "finished" and t.user_attrs["seconds"] >= trained  # the whole trial counts

    shown = run_orch("sweep", "status", spec, "-c", cfg, "--json")
    doc = json.loads(shown.stdout)
    best = min(complete, key=lambda t: t.value)
    assert doc["best"]["run_id"] == best.user_attrs["run_id"] and doc["best"]["value"] == best.value
    assert [t["state"] for t in doc["trials"]] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert doc["hours"] > 0 and doc["usd"] is None
    text = run_orch("sweep", "status", spec, "-c", cfg).stdout
    assert f"best: trial {best.number}, val_loss {best.value:.4f}, run {best.user_attrs['run_id']}" in text
    assert "4 of 4 trials (3 complete, 1 fail)" in text


def test_a_pruned_trial_is_stopped_and_kept_and_the_budget_stops_launching(tmp_path: Path, features: Path) -> None:
    import optuna

    cfg = config(tmp_path, features)
    spec = spec_file(tmp_path, name="pruned", trials=3, objective="val_loss", train={"epochs": 50, "patience": 0},
                     space={"dropout": {"choices": [0.1, 0.2]}}, pruner={"kind": "median", "startup_trials": 1},
                     budget={"instance_hours": 1e-6})
    # A trial the study already holds, better at every epoch than any real one (a loss of 0):
    # the median pruner stops the next at its first epoch, deterministically.
    known = optuna.create_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'sweeps.db'}",
                                direction="minimize")
    known.add_trial(optuna.trial.create_trial(
        params={"dropout": 0.1}, distributions={"dropout": optuna.distributions.CategoricalDistribution([0.1, 0.2])},
        value=0.0, intermediate_values={epoch: 0.0 for epoch in range(1, 51)}))

    proc = run_orch("sweep", "run", spec, "-c", cfg, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["stopped"].startswith("budget: ") and "would pass 1e-06" in doc["stopped"]
    trials = study(tmp_path, "pruned").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]  # the budget left trial 2 unlaunched
    pruned = trials[1]
    assert pruned.user_attrs["pruned_at"] == 1 and list(pruned.intermediate_values) == [1]
    run = tmp_path / "remote" / "runs" / pruned.user_attrs["run_id"]
    st = status(run)
    assert st["state"] == "stopped" and st["epoch"] < 50  # stopped long before its 50 epochs, and kept
    assert pruned.user_attrs["ended"] == "stopped" and (run / "checkpoints" / "state.json").is_file()
    assert f"trial 1: pruned at epoch 1; stopping run {pruned.user_attrs['run_id']}" in proc.stderr
    assert os.listdir(tmp_path / "remote" / "runs") == [run.name]


TWO_GPUS = """#!/bin/sh
case "$1" in
  -L) echo "GPU 0: NVIDIA A10G (UUID: GPU-0)"; echo "GPU 1: NVIDIA A10G (UUID: GPU-1)" ;;
  --query-gpu=*) echo "0, NVIDIA A10G, 0, 0, 23028, 30, 20.5"; echo "1, NVIDIA A10G, 0, 0, 23028, 30, 20.5" ;;
  *) echo "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2 |" ;;
esac
"""


def test_per_gpu_trials_run_at_once_on_the_one_machine_each_seeing_its_gpu_alone(tmp_path: Path,
                                                                                 features: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(TWO_GPUS)  # the machine (target local: this one) has two GPUs
    (fake / "nvidia-smi").chmod(0o755)
    cfg = config(tmp_path, features)
    # Epochs enough, and no early stopping, so that both train at once whatever the load (one
    # trial once finished by early stopping before the other had launched): Ctrl-C twice then stops both.
    spec = spec_file(tmp_path, name="gpus", trials=2, parallel=2, per_gpu=True,
                     train={"epochs": 500, "patience": 0},
                     space={"dropout": {"choices": [0.1, 0.2]}})
    env = {**trainer_env(), "PATH": f"{fake}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", "run", str(spec), "-c", str(cfg),
                             "--allow-cpu", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    runs = tmp_path / "remote" / "runs"

    def both_training() -> dict[str, str] | None:
        seen = {}
        for run in runs.glob("*") if runs.is_dir() else []:
            try:
                pid = int((run / "pid").read_text().split()[0])
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                training = status(run).get("state") == "running"
            except (OSError, ValueError, IndexError):  # not started yet (no status.json), or ended
                continue
            if training:
                seen[run.name] = next((e.split(b"=", 1)[1].decode() for e in environ
                                       if e.startswith(b"CUDA_VISIBLE_DEVICES=")), "all")
        return seen if len(seen) == 2 else None

    try:
        seen = wait_for(both_training, "a trial training on each GPU", proc)  # two at once, on one machine
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        while "Ctrl-C: no further trial is launched" not in (line := proc.stderr.readline()):
            assert line, "orch sweep run ended before it took the first Ctrl-C"
        proc.send_signal(signal.SIGINT)  # the second: each machine's thread stops its trial's run
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    trials = study(tmp_path, "gpus").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert sorted(t.user_attrs["gpu"] for t in trials) == [0, 1]
    for t in trials:  # each trial's trainer saw its GPU alone, its run records it, and was stopped
        run_id = t.user_attrs["run_id"]
        assert seen[run_id] == str(t.user_attrs["gpu"]) == (runs / run_id / "gpu").read_text()
        assert f"GPU {t.user_attrs['gpu']}: trial {t.number}: stopping run {run_id} (Ctrl-C again)" in err
        assert t.user_attrs["ended"] == "stopped (Ctrl-C)" and status(runs / run_id)["state"] == "stopped"
    assert "machine" not in trials[0].user_attrs  # the config's own machine, no instance of the sweep's


def test_a_connection_lost_during_a_launch_leaves_the_trial_to_the_next_sweep_run(
        tmp_path: Path, features: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch went out, its answer never came back: the run may train, so the trial is not
    failed as "not launched" (the sweep would launch another in its place, and the run would
    train unaccounted). It stays RUNNING with its run id, and the next `orch sweep run` follows it."""
    from orchestrator import sweep
    from orchestrator.config import load_config
    from orchestrator.context import Context
    from orchestrator.errors import ConnectionLost
    from orchestrator.machine import Machine
    from orchestrator.sweepspec import load_spec
    from trainer.contract import verbs

    cfg = config(tmp_path, features)
    spec = spec_file(tmp_path, name="cut", trials=1, train={"epochs": 1}, space={"dropout": {"choices": [0.1, 0.2]}})
    original = Machine.answer

    def answer(self: Machine, verb: verbs.Verb, *args: object, **kwargs: object) -> object:
        if verb == verbs.STARTED:  # asked after the launch: the trainer is started by then
            raise ConnectionLost("the connection to localhost was lost during a command")
        return original(self, verb, *args, **kwargs)

    monkeypatch.setattr(Machine, "answer", answer)
    with pytest.raises(ConnectionLost):
        sweep.run(Context(load_config(cfg)), load_spec(spec))
    [trial] = study(tmp_path, "cut").get_trials()
    run_id = trial.user_attrs["run_id"]
    assert trial.state.name == "RUNNING" and "ended" not in trial.user_attrs
    monkeypatch.setattr(Machine, "answer", original)

    done = run_orch("sweep", "run", spec, "-c", cfg, "--json")
    assert done.returncode == 0, done.stderr
    assert f"trial 0: adopting run {run_id}" in done.stderr
    [trial] = study(tmp_path, "cut").get_trials()
    assert trial.state.name == "COMPLETE" and trial.user_attrs["run_id"] == run_id
    assert [p.name for p in (tmp_path / "remote" / "runs").iterdir()] == [run_id]  # trained once
    assert json.loads(done.stdout)["launched"] == []  # followed, not launched again
