"""The generalization measures: batches reproducible per (seed, epoch), a stopped run (weight
average, dropout and the in-graph augmentation on, mixup too) that continues exactly, early
stopping that counts from the committed best. The augmentation layers themselves:
tests/unit/test_model.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

from tests.conftest import frames, write_npy  # noqa: E402
from trainer.ml.config import Architecture, TrainConfig  # noqa: E402
from trainer.ml.data import load_dataset  # noqa: E402
from trainer.ml.dataset import Dataset  # noqa: E402
from trainer.ml.fitting import EarlyStop, ema_momentum  # noqa: E402
from trainer.ml.pipeline import BatchSequence  # noqa: E402

EMOS = ("NEU", "HAP", "SAD", "ANG")


@pytest.fixture(scope="module")
def ds() -> Dataset:
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(40):
            write_npy(Path(tmp) / f"cremad_{1001 + i}_TIE_{EMOS[i % 4]}_XX.npy", frames(5 + 3 * (i % 7), 4, seed=i))
        return load_dataset(tmp, use_cache=False)


def sequence(ds: Dataset, epoch: int) -> BatchSequence:
    weights = np.linspace(0.5, 2.0, len(ds.classes)).astype(np.float32)
    return BatchSequence(ds, np.arange(len(ds)), 8, shuffle=True, seed=3, epoch=epoch, class_weights=weights)


def test_batches_depend_only_on_seed_and_epoch(ds: Dataset) -> None:
    forward = [sequence(ds, 2)[i] for i in range(5)]
    backward = [sequence(ds, 2)[i] for i in reversed(range(5))][::-1]  # worker threads take any order
    for a, b in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(a[0]["frames"], b[0]["frames"])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
    # A continued run builds the sequence at its epoch; an uninterrupted one gets there by on_epoch_end.
    running = sequence(ds, 0)
    running.on_epoch_end()
    running.on_epoch_end()
    np.testing.assert_array_equal(running[0][0]["frames"], forward[0][0]["frames"])
    assert not np.array_equal(sequence(ds, 3)[0][0]["frames"], forward[0][0]["frames"])


def test_ema_momentum_averages_over_the_given_epochs() -> None:
    assert ema_momentum(2.0, 50) == pytest.approx(0.99)
    assert ema_momentum(0.01, 10) == 0.0


# Only sizes are set, and mixup turned on: dropout, head dropout, frame dropout, noise and the
# weight average keep their defaults, so every random generator (mixup's too) and the EMA are
# part of what must continue exactly.
TINY = {"epochs": 3, "batch_size": 16, "learning_rate": 0.003, "warmup_epochs": 1, "patience": 0, "cache": False,
        "mixup": 0.4, "architecture": Architecture(hidden=8, attention=4)}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.ml.synth import synth

    root = tmp_path_factory.mktemp("tiny")
    synth(root, n=120, dim=8, seed=2, min_frames=6, max_frames=20)
    return root


def _train_in_process(data: Path, run: Path, monkeypatch: pytest.MonkeyPatch, signal_at: tuple[str, int] | None = None,
                      finish_epoch_seconds: float | None = None) -> int:
    """trainer.train in this process (one lock per run and process: not what is tested here),
    sent SIGTERM as ``orch stop`` would the n-th time it reaches the failpoint ``signal_at``."""
    import signal

    from trainer.machine import faults
    from trainer.ml import runlock, stopping
    from trainer.ml.train import train

    reached: list[str] = []

    def point(name: str) -> None:
        reached.append(name)
        if signal_at == (name, reached.count(name)):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runlock, "hold", lambda path: None)
    monkeypatch.setattr(faults, "point", point)
    if finish_epoch_seconds is None:
        monkeypatch.delenv(stopping.ENV, raising=False)
    else:
        monkeypatch.setenv(stopping.ENV, str(finish_epoch_seconds))
    return int(train(TrainConfig(data_dir=str(data), run_dir=str(run), **TINY), log=lambda line: None))


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    import json

    from trainer.contract import layout

    rows = [json.loads(line) for line in (run / layout.METRICS).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in layout.TIMING_KEYS} for row in rows]


def test_a_stopped_and_continued_run_trains_exactly_like_an_uninterrupted_one(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default measures: stopped inside epoch 2 (a position), continued and stopped
    again during that epoch's validation (the epoch is kept), continued to the end."""
    import json

    from trainer.contract import layout
    from trainer.ml import runstate

    assert _train_in_process(tiny_data, tmp_path / "uninterrupted", monkeypatch) == 0
    expected = _metrics(tmp_path / "uninterrupted")
    steps = json.loads((tmp_path / "uninterrupted" / layout.HEARTBEAT).read_text())["batches"]
    run = tmp_path / "stopped"
    assert _train_in_process(tiny_data, run, monkeypatch, ("train:batch", steps + 3), finish_epoch_seconds=0) == 9
    state = runstate.read(run)
    assert state.epoch == 1 and state.partial is not None and state.partial.epoch == 2
    assert 3 <= state.partial.batch < steps  # committed where the rest of the epoch can be continued
    assert _train_in_process(tiny_data, run, monkeypatch, ("validate:begin", 1)) == 9
    state = runstate.read(run)
    assert state.epoch == 2 and state.partial is None
    assert _train_in_process(tiny_data, run, monkeypatch) == 0
    assert _metrics(run) == expected
    assert len({row["loss"] for row in expected}) == len(expected)  # the epochs did train


def test_early_stop_counts_from_the_committed_best_epoch() -> None:
    logs: list[str] = []
    state = SimpleNamespace(epoch=7, best_epoch=3)
    stop = EarlyStop(SimpleNamespace(run=SimpleNamespace(state=state)), patience=5, log=logs.append)
    model = SimpleNamespace(stop_training=False)
    stop.set_model(model)
    stop.on_epoch_end(6)
    assert not model.stop_training
    state.epoch = 8
    stop.on_epoch_end(7)
    assert model.stop_training and "best at epoch 3" in logs[0]
    # An extended run whose parent (epoch 0) is still the best stops after `patience` epochs.
    extended = SimpleNamespace(stop_training=False)
    parent_best = SimpleNamespace(run=SimpleNamespace(state=SimpleNamespace(epoch=5, best_epoch=0)))
    stop = EarlyStop(parent_best, patience=5, log=logs.append)
    stop.set_model(extended)
    stop.on_epoch_end(4)
    assert extended.stop_training


def test_plots_mark_the_best_epoch_and_carry_the_run_id(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from trainer.ml.evaluate import plot_curves, plot_title

    history = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.1 * e, "val_loss": 1.0, "val_accuracy": 0.05 * e}
               for e in range(1, 6)]
    for best in (3, 0, None):
        path = tmp_path / f"curves-{best}.png"
        plot_curves(history, path, run_id="r-42", best_epoch=best, note="SYNTHETIC data")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_title("r-42", "SYNTHETIC data") == "run r-42 · SYNTHETIC data"


def test_an_extended_run_keeps_its_parents_generalization_measures(tmp_path: Path) -> None:
    import json

    from trainer.contract import layout, options
    from trainer.ml.config import resolve

    parent = tmp_path / "parent"
    (parent / "checkpoints").mkdir(parents=True)
    (parent / layout.BEST_WEIGHTS).write_bytes(b"weights")
    cfg = TrainConfig(data_dir="d", run_dir=str(parent), frame_dropout=0.2, feature_noise=0.0, ema_epochs=0.0,
                      layer_weighting=False, patience=3)
    (parent / layout.RUN_JSON).write_text(json.dumps({"config": cfg.to_json()}))
    child = resolve({"data_dir": "d", "run_dir": "child", "init_from": str(parent)})
    assert (child.frame_dropout, child.feature_noise, child.ema_epochs, child.layer_weighting) == (0.2, 0.0, 0.0, False)
    assert child.patience == options.default("patience")  # early stopping is the child's own choice
