"""Pure logic of the trainer: report maths, batching, class weights, config rules, run files."""

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.contract import layout, options
from trainer.ml.config import Architecture, TrainConfig, resolve
from trainer.ml.errors import UsageError
from trainer.ml.evaluate import classification_report
from trainer.ml.rundir import RunDir
from trainer.ml.stats import Stats


def test_classification_report_numbers() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    rep = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert rep["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [1, 0, 1]]
    assert rep["accuracy"] == pytest.approx(5 / 8)
    assert rep["per_class"]["a"]["precision"] == pytest.approx(3 / 5)
    assert rep["per_class"]["a"]["recall"] == pytest.approx(3 / 4)
    assert rep["per_class"]["c"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert rep["unweighted_accuracy"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    f1_a = 2 * 0.6 * 0.75 / 1.35
    assert rep["macro_f1"] == pytest.approx((f1_a + 0.5 + 2 / 3) / 3)


def test_length_sorted_batches_cover_everything_once_with_little_padding() -> None:
    pytest.importorskip("keras")
    from trainer.ml.pipeline import length_sorted_batches

    rng_lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    idx = np.arange(1000)
    batches = length_sorted_batches(idx, rng_lengths, 32, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == idx.tolist()
    padded = sum(len(b) * rng_lengths[b].max() for b in batches)
    naive = sum(len(b) * rng_lengths[b].max() for b in np.array_split(np.random.default_rng(2).permutation(idx), 32))
    assert padded < 0.7 * naive  # bucketing removes most of the padding
    again = length_sorted_batches(idx, rng_lengths, 32, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_pad_batch_normalizes_valid_frames_and_zero_pads() -> None:
    pytest.importorskip("keras")
    from trainer.ml.pipeline import pad_batch

    stats = Stats(np.full(4, 1.0, np.float32), np.full(4, 2.0, np.float32))
    batch = pad_batch([np.full((3, 4), 5.0, np.float16), np.full((9, 4), 3.0, np.float16)], stats)
    assert batch["frames"].shape == (2, 16, 4) and batch["lengths"].tolist() == [3, 9]
    assert (batch["frames"][0, :3] == 2.0).all() and (batch["frames"][0, 3:] == 0).all()
    assert (batch["frames"][1, :9] == 1.0).all() and (batch["frames"][1, 9:] == 0).all()


def test_balanced_class_weights() -> None:
    pytest.importorskip("keras")
    from trainer.ml.pipeline import balanced_class_weights

    w = balanced_class_weights(np.array([0] * 70 + [1] * 10 + [2] * 70), 4)
    assert w[1] == pytest.approx(7 * w[0]) and w[3] == 0.0
    assert (np.array([70, 10, 70]) * w[:3]).sum() == pytest.approx(150)


def _fake_parent(tmp_path: Path, lr: float = 0.002, hidden: int = 64) -> Path:
    parent = tmp_path / "parent"
    (parent / layout.CHECKPOINTS_DIR).mkdir(parents=True)
    (parent / layout.BEST_WEIGHTS).write_bytes(b"weights")
    cfg = TrainConfig(data_dir="d", run_dir=str(parent), learning_rate=lr, batch_size=8,
                      split="speaker", architecture=Architecture(hidden=hidden, attention=16))
    (parent / layout.RUN_JSON).write_text(json.dumps({"config": cfg.to_json()}))
    (parent / layout.STATUS).write_text(json.dumps({"state": "finished", "best_val_accuracy": 0.61}))
    return parent


def test_resolve_plain_defaults() -> None:
    cfg = resolve({"data_dir": "d", "run_dir": "r", "epochs": None, "hidden": None, "dropout": 0.1})
    assert cfg.epochs == 100 and cfg.learning_rate == 1e-3 and cfg.architecture.dropout == 0.1
    assert cfg.parent_run is None


def test_resolve_extended_run_recipe(tmp_path: Path) -> None:
    parent = _fake_parent(tmp_path)
    cfg = resolve({"data_dir": "d", "run_dir": "child", "init_from": str(parent), "epochs": None,
                   "learning_rate": None, "warmup_epochs": None, "hidden": None})
    assert cfg.learning_rate == pytest.approx(0.001) and cfg.epochs == options.BY_NAME["epochs"].extend
    assert cfg.warmup_epochs == 1 and cfg.batch_size == 8 and cfg.split == "speaker"
    assert cfg.architecture == Architecture(hidden=64, attention=16)
    assert cfg.parent_run == "parent" and cfg.parent_best_val_accuracy == 0.61
    assert cfg.stats_dir == str(parent / "stats")
    given = resolve({"data_dir": "d", "run_dir": "c", "init_from": str(parent), "epochs": 7,
                     "learning_rate": 0.01, "dropout": 0.5})
    assert (given.epochs, given.learning_rate, given.architecture.dropout) == (7, 0.01, 0.5)


def test_resolve_refuses_a_conflicting_architecture(tmp_path: Path) -> None:
    parent = _fake_parent(tmp_path)
    with pytest.raises(UsageError, match="--hidden 128 conflicts with the parent run's architecture"):
        resolve({"data_dir": "d", "run_dir": "c", "init_from": str(parent), "hidden": 128})
    assert resolve({"data_dir": "d", "run_dir": "c", "init_from": str(parent), "hidden": 64})
    with pytest.raises(UsageError, match="--classes differs"):
        resolve({"data_dir": "d", "run_dir": "c", "init_from": str(parent), "classes": "happy,sad"})
    with pytest.raises(UsageError, match="neither a run directory"):
        resolve({"data_dir": "d", "run_dir": "c", "init_from": str(tmp_path)})


def test_config_json_roundtrip() -> None:
    cfg = TrainConfig(data_dir="d", run_dir="r", classes=("happy", "sad"), architecture=Architecture(32, 8, 0.2))
    assert TrainConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_run_dir_files(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_pid()
    pid, start = (run.file(layout.PID_FILE).read_text().split() + [""])[:2]
    assert int(pid) > 0 and start.isdigit()
    run.write_status(layout.RUNNING, epoch=1, epochs=5)
    run.write_status(layout.FAILED, error="boom")
    status = json.loads(run.file(layout.STATUS).read_text())
    assert status["state"] == "failed" and status["error"] == "boom" and status["epochs"] == 5
    assert set(status) >= {"state", "epoch", "epochs", "error", "updated_at"}
    (run.file(layout.stats_path("classes.json"))).write_text("[]")
    saved = run.write_checkpoint(1, lambda tmp: tmp.write_bytes(b"w" * 100))
    run.commit(run.state.after_epoch({"epoch": 1, "val_accuracy": 0.5}, saved))
    run.publish(layout.RUNNING)
    assert run.file(layout.METRICS).read_text() == '{"epoch": 1, "val_accuracy": 0.5}\n'
    status = json.loads(run.file(layout.STATUS).read_text())
    assert (status["state"], status["error"], status["epoch"], status["best_epoch"]) == ("running", None, 1, 1)
    entries = layout.parse_manifest(run.file(layout.MANIFEST).read_text())
    # while running: what does not change (status and metrics do)
    assert list(entries) == [layout.BEST_WEIGHTS, "stats/classes.json"]
    import hashlib

    assert entries[layout.BEST_WEIGHTS] == hashlib.sha256(b"w" * 100).hexdigest()
    run.finish(layout.FINISHED)
    entries = layout.parse_manifest(run.file(layout.MANIFEST).read_text())
    assert list(entries) == [layout.BEST_WEIGHTS, "stats/classes.json", layout.STATUS, layout.METRICS,
                             layout.TENSORBOARD_TRAIN, layout.TENSORBOARD_VALIDATION]  # event files: once it ended


def test_parse_manifest_rejects_garbage() -> None:
    assert layout.parse_manifest("a" * 64 + "  x/y\n\n") == {"x/y": "a" * 64}
    with pytest.raises(ValueError):
        layout.parse_manifest("nonsense line")


def test_first_two_batches_differ_in_padded_length() -> None:
    """Keras infers the input signature from the first 2 batches (see BatchSequence._plan)."""
    pytest.importorskip("keras")
    import tempfile

    from tests.conftest import frames, write_npy
    from trainer.ml.data import load_dataset
    from trainer.ml.pipeline import BatchSequence, padded_length

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(64):  # mostly one padded length, a few longer sequences
            write_npy(Path(tmp) / f"cremad_{1001 + i}_TIE_HAP_XX.npy", frames(40 if i % 16 == 0 else 5, 4))
        ds = load_dataset(tmp, use_cache=False)
    stats = Stats(np.zeros(4, np.float32), np.ones(4, np.float32))
    for epoch in range(20):
        seq = BatchSequence(ds, np.arange(len(ds)), stats, 4, shuffle=True, seed=0, epoch=epoch)
        first, second = (padded_length(int(seq.lengths[b].max())) for b in seq.plan[:2])
        assert first != second
        assert sorted(np.concatenate(seq.plan).tolist()) == list(range(len(ds)))
