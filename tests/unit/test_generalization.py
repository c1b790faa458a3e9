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
from trainer.ml.errors import DataError  # noqa: E402
from trainer.ml.fitting import EarlyStop, ema_momentum  # noqa: E402
from trainer.ml.pipeline import BatchSequence  # noqa: E402
from trainer.ml.stats import Stats  # noqa: E402

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


# ---- per-speaker normalization (trainer/ml/speakers.py)


def _speaker_files(root: Path, voices: dict[int, tuple[int, float, float]], seed: int = 0) -> None:
    """CREMA-D files: per speaker id, (files, offset, gain) of its frames."""
    rng = np.random.default_rng(seed)
    for speaker, (count, offset, gain) in voices.items():
        for k in range(count):
            x = offset + gain * rng.standard_normal((6 + k % 3, 4))
            write_npy(root / f"cremad_{speaker}_TIE_{EMOS[k % 4]}_XX_{k}.npy", x.astype(np.float32))


def test_per_speaker_normalization_keeps_validation_speakers_out_of_training_statistics(tmp_path: Path) -> None:
    from trainer.ml.speakers import FALLBACK, normalize_training_data
    from trainer.ml.split import Split
    from trainer.ml.stats import compute_stats, load_stats

    def normalized(folder: Path, validation_offset: float) -> tuple[Dataset, Split, Stats, list[str]]:
        _speaker_files(folder, {1001: (12, 3.0, 2.0), 1002: (12, -1.0, 0.5), 1003: (4, 0.0, 1.0),
                                1004: (12, validation_offset, 5.0)})
        ds = load_dataset(folder, use_cache=False)
        val = np.array([i for i, s in enumerate(ds.samples) if s.speaker == "1004"])
        split = Split("speaker", 0, 0.3, np.setdiff1d(np.arange(len(ds)), val), val)
        raw = compute_stats(ds, split.train)
        logs: list[str] = []
        norm = normalize_training_data(ds, split, 10, folder / "own", None, logs.append)
        np.testing.assert_array_equal(norm.fallback.mean, raw.mean)  # the training split's raw frames only
        saved = load_stats(folder / "own", ds.feature_shape, FALLBACK)
        np.testing.assert_array_equal(saved.mean, raw.mean)
        return ds, split, compute_stats(ds, split.train), logs

    ds, split, model_stats, logs = normalized(tmp_path / "a", validation_offset=0.0)
    moved, _, moved_stats, _ = normalized(tmp_path / "b", validation_offset=500.0)
    # What training sees and the model's statistics do not depend on the validation speaker at all.
    for i in split.train:
        np.testing.assert_array_equal(ds.sequence(int(i)), moved.sequence(int(i)))
    np.testing.assert_array_equal(model_stats.mean, moved_stats.mean)
    # Every speaker with 10 files, the validation one too, is standardized with its own statistics;
    # speaker 1003 (4 files) gets the training split's global ones.
    for speaker in ("1001", "1002", "1004"):
        own = np.concatenate([moved.sequence(i) for i, s in enumerate(moved.samples) if s.speaker == speaker])
        np.testing.assert_allclose(own.astype(np.float32).mean(axis=0), 0.0, atol=0.01)
        np.testing.assert_allclose(own.astype(np.float32).std(axis=0), 1.0, atol=0.01)
    assert logs == ["normalization: per speaker for 36 files of 3 speakers; global statistics for 4 files "
                    "(their speaker has fewer than 10 files here, or their name names none)"]
    # Raw statistics given with --stats-dir cannot stand in for the fallback of a run trained per speaker.
    from trainer.ml.stats import save_stats

    save_stats(model_stats, tmp_path / "given")
    with pytest.raises(DataError, match="per-speaker normalization needs the statistics of a run trained with it"):
        normalize_training_data(ds, split, 10, tmp_path / "c", tmp_path / "given", logs.append)


def test_prediction_normalizes_a_speaker_alone_only_with_enough_files() -> None:
    from trainer.ml.speakers import Normalization

    rng = np.random.default_rng(4)
    fallback = Stats(np.full(4, 5.0, np.float32), np.full(4, 2.0, np.float32))
    sequences = [7.0 + 3.0 * rng.standard_normal((5, 4)).astype(np.float32) for _ in range(6)]
    keys = ["cremad:1001"] * 3 + ["cremad:1002"] * 2 + [None]
    out, plan = Normalization(3, fallback).apply(sequences, keys)
    assert plan.modes == ("speaker",) * 3 + ("global",) * 3
    own = np.concatenate(out[:3])
    np.testing.assert_allclose(own.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(own.std(axis=0), 1.0, atol=1e-4)
    for x, seq in zip(out[3:], sequences[3:], strict=True):
        np.testing.assert_allclose(x, (seq - 5.0) / 2.0, rtol=1e-6)
    assert plan.summary() == {"per_speaker_files": 3, "speakers": 1, "global_files": 3, "speaker_min_files": 3}
    # A run trained with --normalization global leaves the frames to its global statistics.
    same, plain = Normalization(3, None).apply(sequences, keys)
    assert plain.modes == ("global",) * 6 and all(np.array_equal(a, b) for a, b in zip(same, sequences, strict=True))
    assert plain.describe() == "normalization: global statistics for all 6 files (the run's --normalization global)"


def test_predict_says_which_normalization_each_file_got(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from trainer.contract import layout
    from trainer.ml.cli import main
    from trainer.ml.model import build_model
    from trainer.ml.speakers import FALLBACK
    from trainer.ml.stats import save_stats

    run = tmp_path / "run"
    cfg = TrainConfig(data_dir="d", run_dir=str(run), normalization="speaker", speaker_min_files=3,
                      architecture=Architecture(hidden=8, attention=4))
    (run / layout.CHECKPOINTS_DIR).mkdir(parents=True)
    (run / layout.RUN_JSON).write_text(json.dumps({"config": cfg.to_json(), "feature_shape": [4]}))
    unit = Stats(np.zeros(4, np.float32), np.ones(4, np.float32))
    build_model(cfg.architecture, unit, len(cfg.classes)).save_weights(run / layout.BEST_WEIGHTS)
    save_stats(unit, run / layout.STATS_DIR)
    save_stats(unit, run / layout.STATS_DIR, FALLBACK)
    folder = tmp_path / "new"
    _speaker_files(folder, {1001: (3, 2.0, 1.0), 1002: (2, 0.0, 1.0)})
    assert main(["predict", "--run-dir", str(run), str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("normalization: per speaker for 3 files of 1 speakers; global statistics for 2 files "
                        "(their speaker has fewer than 3 files here, or their name names none)")
    assert sorted(line.split()[2] for line in lines[1:]) == ["global"] * 2 + ["speaker"] * 3
    assert main(["predict", "--run-dir", str(run), str(folder), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {Path(r["path"]).name.split("_")[1]: r["normalization"] for r in rows} == {"1001": "speaker",
                                                                                      "1002": "global"}
    # A run.json written before the option existed is predicted as that trainer did: globally.
    old = {k: v for k, v in cfg.to_json().items() if k != "normalization"}
    (run / layout.RUN_JSON).write_text(json.dumps({"config": old, "feature_shape": [4]}))
    assert main(["predict", "--run-dir", str(run), str(folder), "--json"]) == 0
    assert {json.loads(line)["normalization"] for line in capsys.readouterr().out.splitlines()} == {"global"}


# ---- the SYNTHETIC data's difficulty (trainer/ml/synth.py)


def _variance_shares(root: Path) -> dict[str, float]:
    """Measured on generated files: the share of the variance of per-file mean vectors (each
    feature z-scored) that speakers and that emotions explain, the spread of log per-speaker
    feature scales, and the within-(speaker, class) spread of file means."""
    ds = load_dataset(root, use_cache=False)
    means = np.stack([ds.sequence(i).astype(np.float64).mean(axis=0) for i in range(len(ds))])
    means = (means - means.mean(axis=0)) / means.std(axis=0)
    stds = np.stack([ds.sequence(i).astype(np.float64).std(axis=0) for i in range(len(ds))])

    def explained(groups: list[str]) -> float:
        keys = np.array(groups)
        centred = np.stack([means[keys == k].mean(axis=0) for k in keys])
        return float((centred**2).mean())

    speakers = [f"{s.corpus}:{s.speaker}" for s in ds.samples]
    scale = {k: np.log(stds[np.array(speakers) == k]).mean(axis=0) for k in set(speakers)}
    cells = [f"{k}:{s.label}" for k, s in zip(speakers, ds.samples, strict=True)]
    return {"speaker": explained(speakers), "emotion": explained([s.label for s in ds.samples]),
            "speaker_scale": float(np.stack(list(scale.values())).std(axis=0).mean()),
            "within_cell": 1.0 - explained(cells)}


def test_synth_speakers_outweigh_emotions_and_the_difficulty_comes_from_each_knob(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.ml import synth

    def shares(name: str, **knobs: float) -> dict[str, float]:
        with monkeypatch.context() as m:
            for knob, value in knobs.items():
                m.setattr(synth, knob, value)
            synth.synth(tmp_path / name, n=300, dim=16, seed=3, min_frames=10, max_frames=20)
        return _variance_shares(tmp_path / name)

    default = shares("default")
    assert default["speaker"] > 3 * default["emotion"] > 0.03  # more speaker than emotion, some emotion
    # The speaker effect is partly multiplicative: per-speaker feature scales spread with SPEAKER_GAIN.
    assert default["speaker_scale"] > 1.5 * shares("no-gain", SPEAKER_GAIN=0.0)["speaker_scale"]
    # Every utterance is coloured on its own: files of one speaker and class differ more with it.
    assert default["within_cell"] > 1.2 * shares("no-colour", COLOUR_AMP=0.0, UTTERANCE_GAIN=0.0)["within_cell"]
    # The emotion is in a fraction of the frames only.
    rng = np.random.default_rng(0)
    world = synth._make_world(rng, 16, 1, 1.0)
    tracks = [synth._emotion_track(rng, synth._make_speaker(rng, world), 60) for _ in range(50)]
    share = np.mean([np.count_nonzero(t) / len(t) for t in tracks])
    assert synth.EMOTIONAL_SHARE[0] * 0.5 < share < synth.EMOTIONAL_SHARE[1] * 1.2


# ---- layer selection (trainer/ml/layerselect.py)


def test_layers_auto_keeps_the_layers_around_the_one_that_carries_the_emotion(tmp_path: Path) -> None:
    from trainer.contract import options
    from trainer.ml import layerselect
    from trainer.ml.split import make_split

    rng = np.random.default_rng(5)
    for i in range(80):
        x = rng.standard_normal((5, 6 + i % 4, 3)).astype(np.float32)  # (L, T, D)
        x[3, :, i % 4 % 3] += 1.5 * (1 if i % 4 < 3 else -1)  # only layer 3 knows the class
        x[:2] += i % 8  # the lower layers know the speaker
        write_npy(tmp_path / f"cremad_{1001 + i % 8}_TIE_{EMOS[i % 4]}_XX_{i}.npy", x)
    ds = load_dataset(tmp_path, use_cache=False)
    split = make_split(ds, "speaker", 0.25, seed=0)
    raw = np.asarray(ds.frames, dtype=np.float32).copy()
    logs: list[str] = []
    spec = layerselect.resolve("auto", ds, split, logs.append)
    assert spec == "2,3,4" and logs[0].startswith("layers 2,3,4 of 5 (--layers auto")
    layerselect.take(ds, spec)
    assert ds.feature_shape == (3, 3)
    np.testing.assert_array_equal(np.asarray(ds.frames, dtype=np.float32), raw[:, 2:5])
    # predict takes the same layers of a (T, L, D) sequence; (T, D) inputs have none to take
    np.testing.assert_array_equal(layerselect.frames_of(raw[:4], spec), raw[:4, 2:5])
    assert layerselect.frames_of(raw[:4, 0], spec).shape == (4, 3)
    # the option's values, written one way; anything else is one clear error
    assert options.validate({"layers": " 6-8,2 "}) == {"layers": "2,6,7,8"}
    assert options.validate({"layers": "AUTO"}) == {"layers": "auto"}
    with pytest.raises(options.OptionError, match="layers: give all, auto, or distinct 0-based layer numbers"):
        options.validate({"layers": "3,3"})
    with pytest.raises(DataError, match="the features have 3 layers"):
        layerselect.take(ds, "1,7")
