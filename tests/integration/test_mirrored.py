"""The trainer on several devices (MirroredStrategy), as on a box with two GPUs: here a CPU split
into two logical devices (tests/integration/two_cpus.py). Each batch is topped up to a multiple
of the replicas with rows that weigh nothing, so an odd batch trains, and validation accuracy
counts real files only; run.json records the devices; a run killed and continued has exactly the
uninterrupted run's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.trainer_proc import ROOT, metrics, status, trainer_env
from trainer.contract import layout
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
# Odd sizes on purpose: 59 files, batches of 7 (an odd last batch, and an odd validation split).
TINY = ["--epochs", "4", "--batch-size", "7", "--hidden", "8", "--attention", "4", "--seed", "1", "--patience", "0"]


def mirrored(data: Path, run: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.integration.two_cpus", "train", "--data-dir", str(data),
                           "--run-dir", str(run), *TINY], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**trainer_env(), **(env or {})})


def test_two_replicas_train_record_themselves_score_real_files_only_and_continue_exactly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synth(data, n=60, dim=8, seed=8, min_frames=4, max_frames=6)
    whole = tmp_path / "whole"
    done = mirrored(data, whole)
    assert done.returncode == 0, done.stderr[-2000:]
    run_json = json.loads((whole / layout.RUN_JSON).read_text())
    assert run_json["devices"] == "2 CPUs (MirroredStrategy)"
    assert status(whole)["state"] == "finished"
    best = status(whole)["best_val_accuracy"]
    evaluation = json.loads((whole / layout.stats_path(layout.EVALUATION_JSON)).read_text())
    assert evaluation["accuracy"] == pytest.approx(best, abs=1e-6)  # the topping-up rows were not counted
    # Killed (SIGKILL) at its third commit, mid-run, and continued: the uninterrupted run's metrics exactly.
    cut = tmp_path / "cut"
    killed = mirrored(data, cut, {"ORCH_TRAINER_KILL_AT": "commit:done@3"})
    assert killed.returncode == -9 and 1 <= len(metrics(cut)) < 4, killed.stderr[-2000:]
    again = mirrored(data, cut)
    assert again.returncode == 0, again.stderr[-2000:]

    def without_seconds(run: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics(run)]

    assert without_seconds(cut) == without_seconds(whole)
