"""Real training runs (TensorFlow, tiny SYNTHETIC data): the run directory contract,
continue after SIGKILL, SIGTERM, extended training, predict vs evaluate, NaN."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.trainer_proc import metrics, run_trainer, start_trainer, status, wait_for_epochs
from trainer.contract import layout
from trainer.ml.synth import synth
from trainer.ml.tbevents import read_steps

pytestmark = pytest.mark.slow


def event_steps(path: Path) -> list[int]:
    """The steps of a TensorBoard event file's scalar events, in order."""
    return [step for _end, step in read_steps(path.read_bytes()) if step is not None]

# No early stopping: these tests count epochs.
TINY = ["--batch-size", "16", "--hidden", "32", "--attention", "16", "--seed", "1", "--patience", "0"]
GLOBAL = ["--normalization", "global"]  # the global statistics alone: what --stats-dir gives


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    # Easier than the default SYNTHETIC set (which 360 tiny files and 12 epochs barely learn), so
    # "starts at the parent's level, not a fresh start" has a level to tell apart from chance.
    synth(root, n=360, dim=24, seed=3, min_frames=8, max_frames=24, difficulty=0.3)
    return root


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """One finished run that several tests read."""
    run = tmp_path_factory.mktemp("runs") / "parent"
    run_trainer("train", "--data-dir", data, "--run-dir", run, "--epochs", "12", "--learning-rate", "0.003",
                "--warmup-epochs", "1", *TINY)
    return run


def test_training_writes_every_file_of_the_contract(parent: Path) -> None:
    st = status(parent)
    assert st["state"] == "finished" and st["epoch"] == st["epochs"] == 12 and st["error"] is None
    assert set(st) >= {"state", "epoch", "epochs", "best_val_accuracy", "best_epoch", "error", "updated_at"}
    rows = metrics(parent)
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    for row in rows:
        assert set(row) >= set(layout.METRIC_KEYS) and all(np.isfinite(row[k]) for k in layout.METRIC_KEYS)
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert st["best_val_accuracy"] == best["val_accuracy"] and st["best_epoch"] == best["epoch"]
    assert rows[0]["lr"] < rows[1]["lr"] or rows[0]["lr"] > rows[-1]["lr"]  # warm-up, then decay

    run_json = json.loads((parent / layout.RUN_JSON).read_text())
    assert run_json["classes"] == json.loads((parent / "stats/classes.json").read_text())
    assert run_json["feature_shape"] == [24] and run_json["parent_run"] is None
    assert run_json["config"]["epochs"] == 12 and len(run_json["code_version"]) == 12
    assert run_json["started_at"] and run_json["backend"] == "tensorflow"
    pid, start = (parent / layout.PID_FILE).read_text().split()
    assert int(pid) > 0 and int(start) > 0

    state = json.loads((parent / layout.STATE).read_text())
    assert state["epoch"] == 12 and [r["epoch"] for r in state["history"]] == list(range(1, 13))
    assert state["best_epoch"] == st["best_epoch"] and state["best"]["file"] == layout.epoch_weights(st["best_epoch"])
    assert state["last"]["file"] == layout.epoch_weights(12)
    # best.weights.h5 is the state's best file; no other epoch file is left
    assert (parent / layout.BEST_WEIGHTS).read_bytes() == (parent / state["best"]["file"]).read_bytes()
    assert {p.name for p in (parent / layout.CHECKPOINTS_DIR).iterdir()} == {
        "state.json", "best.weights.h5", Path(state["best"]["file"]).name, Path(state["last"]["file"]).name}
    assert (parent / layout.BEST_WEIGHTS).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    stats = parent / layout.STATS_DIR
    assert np.load(stats / layout.STATS_MEAN).shape == (24,) and (np.load(stats / layout.STATS_STD) > 0).all()
    split = json.loads((stats / layout.SPLIT_JSON).read_text())
    assert split["method"] == "speaker" and not set(split["train"]) & set(split["validation"])
    report = json.loads((stats / layout.EVALUATION_JSON).read_text())
    assert set(report) >= {"confusion_matrix", "per_class", "macro_f1", "unweighted_accuracy", "accuracy"}
    assert report["samples"] == len(split["validation"])
    assert report["accuracy"] == pytest.approx(st["best_val_accuracy"], abs=1e-6)
    for png in (layout.CURVES_PNG, layout.CONFUSION_PNG):
        assert (stats / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # TensorBoard's scalars: one event per epoch, its step the epoch (from 1, like metrics.jsonl), nothing else there
    assert {p.relative_to(parent).as_posix() for p in (parent / layout.TENSORBOARD_DIR).rglob("*") if p.is_file()} \
        == set(layout.TENSORBOARD_FILES)
    assert all(event_steps(parent / rel) == list(range(1, 13)) for rel in layout.TENSORBOARD_FILES)
    assert not list(parent.rglob(".tmp*")) and not list(parent.rglob("*.tmp"))  # no temp leftovers


def test_manifest_verifies_with_sha256sum(parent: Path) -> None:
    listed = layout.parse_manifest((parent / layout.MANIFEST).read_text())
    assert set(listed) >= {layout.BEST_WEIGHTS, layout.RUN_JSON, layout.STATUS, layout.METRICS, *layout.TENSORBOARD_FILES}
    assert {p.relative_to(parent).as_posix() for p in (parent / "stats").iterdir()} <= set(listed)
    check = subprocess.run(["sha256sum", "-c", layout.MANIFEST], cwd=parent, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == len(listed)


def test_sigkill_then_restart_continues_without_losing_or_repeating_epochs(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "killed"
    args = ["train", "--data-dir", data, "--run-dir", run, "--epochs", "10", *TINY]
    proc = start_trainer(*args, log=tmp_path / "first.log")
    wait_for_epochs(run, 3, proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    killed_at = len(metrics(run))
    assert status(run)["state"] == "running" and killed_at < 10
    best_before = json.loads((run / layout.STATE).read_text())["best_val_accuracy"]

    result = run_trainer(*args)
    assert f"continuing from epoch {killed_at}" in result.stdout or "continuing from epoch" in result.stdout
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, 11))  # same count as uninterrupted, no duplicates
    assert event_steps(run / layout.TENSORBOARD_VALIDATION) == list(range(1, 11))  # ... in TensorBoard too
    st = status(run)
    assert st["state"] == "finished" and st["best_val_accuracy"] >= best_before
    assert st["best_val_accuracy"] == max(r["val_accuracy"] for r in rows)


def test_sigterm_marks_stopped_and_the_run_can_continue(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "term"
    args = ["train", "--data-dir", data, "--run-dir", run, "--epochs", "30", *TINY]
    proc = start_trainer(*args, log=tmp_path / "term.log")
    wait_for_epochs(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 9
    st = status(run)
    assert st["state"] == "stopped" and st["error"] is None
    done = len(metrics(run))
    assert st["epoch"] == done and done < 30
    assert "stopped by signal" in (tmp_path / "term.log").read_text()
    # Continue to the end (fewer epochs to keep the test short is not allowed: config is kept).
    run_trainer(*args)
    assert [r["epoch"] for r in metrics(run)] == list(range(1, 31))
    assert status(run)["state"] == "finished"


def test_sigterm_during_start_up_marks_stopped(tmp_path: Path, data: Path) -> None:
    run = tmp_path / "early"
    proc = start_trainer("train", "--data-dir", data, "--run-dir", run, "--epochs", "5", *TINY, log=tmp_path / "early.log")
    while not (run / layout.STATUS).exists():  # written first, before TensorFlow is imported
        assert proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 9
    assert status(run)["state"] == "stopped" and metrics(run) == []


def test_init_from_starts_at_the_parents_level(tmp_path: Path, data: Path, parent: Path) -> None:
    parent_status = status(parent)
    parent_cfg = json.loads((parent / layout.RUN_JSON).read_text())["config"]
    child = tmp_path / "child"
    run_trainer("train", "--data-dir", data, "--run-dir", child, "--init-from", parent, "--epochs", "2")
    run_json = json.loads((child / layout.RUN_JSON).read_text())
    cfg = run_json["config"]
    assert run_json["parent_run"] == "parent"
    assert cfg["learning_rate"] == pytest.approx(parent_cfg["learning_rate"] / 2)
    assert cfg["warmup_epochs"] == 1 and cfg["architecture"] == parent_cfg["architecture"]
    for rel in (layout.SPLIT_JSON, layout.STATS_MEAN, layout.STATS_STD):
        assert (child / "stats" / rel).read_bytes() == (parent / "stats" / rel).read_bytes()

    first = metrics(child)[0]["val_accuracy"]
    scratch = metrics(parent)[0]["val_accuracy"]
    assert first >= parent_status["best_val_accuracy"] - 0.1  # the parent's level ...
    assert first > scratch + 0.1  # ... not a fresh start
    # in TensorBoard its curves go on from the parent's best epoch, where its weights come from
    assert cfg["parent_step"] == parent_status["best_epoch"]
    assert event_steps(child / layout.TENSORBOARD_VALIDATION) == [parent_status["best_epoch"] + 1,
                                                                   parent_status["best_epoch"] + 2]
    st = status(child)
    # "best" starts at the parent's best and only moves when the child beats it.
    assert st["best_val_accuracy"] >= parent_status["best_val_accuracy"]
    if st["best_epoch"] == 0:
        assert (child / layout.BEST_WEIGHTS).read_bytes() == (parent / layout.BEST_WEIGHTS).read_bytes()


def test_init_from_refuses_an_incompatible_architecture(tmp_path: Path, data: Path, parent: Path) -> None:
    proc = run_trainer("train", "--data-dir", data, "--run-dir", tmp_path / "bad", "--init-from", parent,
                       "--hidden", "64", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("trainer: error: --hidden 64 conflicts with the parent run's architecture "
                                   "(hidden=32); an extended run keeps the parent's architecture: drop the option")
    # A bare weights file is checked against the architecture built from the options.
    proc = run_trainer("train", "--data-dir", data, "--run-dir", tmp_path / "bad2", "--init-from",
                       parent / layout.BEST_WEIGHTS, "--hidden", "64", "--epochs", "1", check=False)
    last = proc.stderr.strip().splitlines()[-1]  # (TensorFlow's own start-up banner comes before)
    assert proc.returncode == 2 and last.startswith("trainer: error: --init-from ")
    assert "weights do not fit this architecture" in last and "UserWarning" not in proc.stderr
    assert status(tmp_path / "bad2")["state"] == "failed"


def test_evaluate_scores_the_validation_split_not_the_training_files(data: Path, parent: Path) -> None:
    split = json.loads((parent / "stats" / layout.SPLIT_JSON).read_text())
    evaluated = json.loads(run_trainer("evaluate", "--run-dir", parent, "--data-dir", data, "--json").stdout)
    assert evaluated["samples"] == len(split["validation"])
    assert evaluated["scope"]["scope"] == "validation" and not evaluated["scope"]["training_files_scored"]
    assert evaluated["scope"]["training_files"] == len(split["train"])
    # ... and it is the validation accuracy the run itself recorded for its best checkpoint
    assert evaluated["accuracy"] == pytest.approx(status(parent)["best_val_accuracy"], abs=1e-6)
    human = run_trainer("evaluate", "--run-dir", parent, "--data-dir", data).stdout
    assert f"scored {len(split['validation'])} of the run's validation split" in human
    assert f"{len(split['train'])} training-split files left out (--all scores them too)" in human
    everything = json.loads(run_trainer("evaluate", "--run-dir", parent, "--data-dir", data, "--all", "--json").stdout)
    assert everything["samples"] == len(split["train"]) + len(split["validation"])
    assert everything["scope"]["scope"] == "all" and everything["scope"]["training_files_scored"]
    assert "TRAINING split" in run_trainer("evaluate", "--run-dir", parent, "--data-dir", data, "--all").stdout


def test_predict_matches_evaluate(tmp_path: Path, data: Path, parent: Path) -> None:
    evaluated = json.loads(run_trainer("evaluate", "--run-dir", parent, "--data-dir", data, "--all",
                                       "--json").stdout)
    classes = evaluated["classes"]
    from trainer.contract.labels import label_from_path

    # The files evaluate scores (RAVDESS surprise is not a class): per-speaker normalization
    # computes each speaker's statistics over the files it is given, so both get the same ones.
    files = sorted(p for p in data.iterdir() if label_from_path(p.name).label in classes)
    lines = run_trainer("predict", "--run-dir", parent, *files, "--json").stdout.splitlines()
    predictions = [json.loads(line) for line in lines]
    # Every speaker of the set has enough files: each file says it was normalized as the run was.
    per_speaker = evaluated["normalization"]["speaker_min_files"] is not None
    assert {p["normalization"] for p in predictions} == {"speaker" if per_speaker else "global"}

    scored = [(label_from_path(Path(p["path"]).name).label, p) for p in predictions]
    scored = [(truth, p) for truth, p in scored if truth in classes]  # surprise files are not in the classes
    assert len(scored) == evaluated["samples"]
    correct = sum(truth == p["label"] for truth, p in scored)
    assert correct / len(scored) == pytest.approx(evaluated["accuracy"])
    cm = np.zeros((len(classes), len(classes)), int)
    for truth, p in scored:
        cm[classes.index(truth), classes.index(p["label"])] += 1
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert max(p["probabilities"], key=p["probabilities"].get) == p["label"]
    assert cm.tolist() == evaluated["confusion_matrix"]
    human = run_trainer("evaluate", "--run-dir", parent, "--data-dir", data).stdout
    assert "Confusion matrix" in human and "unweighted accuracy" in human


def test_given_statistics_are_used_not_recomputed(tmp_path: Path, data: Path) -> None:
    given = tmp_path / "given"
    given.mkdir()
    np.save(given / layout.STATS_MEAN, np.full(24, 0.5, np.float32))
    np.save(given / layout.STATS_STD, np.full(24, 2.0, np.float32))
    run = tmp_path / "with-stats"
    out = run_trainer("train", "--data-dir", data, "--run-dir", run, "--epochs", "1", "--stats-dir", given, *GLOBAL,
                      *TINY)
    assert f"normalization statistics from {given}" in out.stdout
    assert (np.load(run / "stats" / layout.STATS_MEAN) == 0.5).all()
    assert (np.load(run / "stats" / layout.STATS_STD) == 2.0).all()
    # Found in the data folder itself (the old scripts' layout), they are used too.
    import shutil

    local = tmp_path / "data-with-stats"
    shutil.copytree(data, local)
    shutil.copy(given / layout.STATS_MEAN, local)
    shutil.copy(given / layout.STATS_STD, local)
    run2 = tmp_path / "found-stats"
    out = run_trainer("train", "--data-dir", local, "--run-dir", run2, "--epochs", "1", *GLOBAL, *TINY)
    assert f"normalization statistics from {local}\n" in out.stdout
    assert (np.load(run2 / "stats" / layout.STATS_STD) == 2.0).all()
    # Per-speaker normalization (the default): raw statistics describe no normalized frame, so the
    # data folder's are not used, and a --stats-dir must be a run's that was trained that way.
    out = run_trainer("train", "--data-dir", local, "--run-dir", tmp_path / "per-speaker", "--epochs", "1", *TINY)
    assert "normalization statistics computed on the training split" in out.stdout
    refused = run_trainer("train", "--data-dir", data, "--run-dir", tmp_path / "refused", "--stats-dir", given,
                          "--epochs", "1", *TINY, check=False)
    assert refused.returncode == 13 and "per-speaker normalization needs the statistics of a run" in refused.stderr
    # A --stats-dir without statistics is an error, even when the data folder has some.
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run_trainer("train", "--data-dir", local, "--run-dir", tmp_path / "no-stats", "--stats-dir", empty,
                          "--epochs", "1", *GLOBAL, *TINY, check=False)
    assert missing.returncode == 13 and f"--stats-dir {empty}: no wav2vec_mean.npy" in missing.stderr
    # Wrong shape: one clear error, state failed.
    np.save(given / layout.STATS_MEAN, np.zeros(5, np.float32))
    bad = run_trainer("train", "--data-dir", data, "--run-dir", tmp_path / "bad-stats", "--stats-dir", given,
                      "--epochs", "1", *GLOBAL, *TINY, check=False)
    assert bad.returncode == 13 and "does not match the features' per-frame shape" in bad.stderr.strip().splitlines()[-1]


def test_nan_loss_ends_in_failed_with_a_message(tmp_path: Path, data: Path) -> None:
    # Statistics whose normalization overflows float32 (a corrupt stats file): inputs become
    # infinite, the loss NaN.
    stats = tmp_path / "bad-stats"
    stats.mkdir()
    np.save(stats / layout.STATS_MEAN, np.full(24, 3e38, np.float32))
    np.save(stats / layout.STATS_STD, np.full(24, 1e-5, np.float32))
    run = tmp_path / "nan"
    proc = run_trainer("train", "--data-dir", data, "--run-dir", run, "--epochs", "3", "--stats-dir", stats,
                       *GLOBAL, *TINY, check=False)
    assert proc.returncode == 8
    st = status(run)
    assert st["state"] == "failed" and "loss became nan at epoch 1" in st["error"]
    assert proc.stderr.strip().splitlines()[-1] == f"trainer: error: {st['error']}"
    assert not (run / layout.BEST_WEIGHTS).exists()  # never a NaN checkpoint as "best"
    assert metrics(run) == []
