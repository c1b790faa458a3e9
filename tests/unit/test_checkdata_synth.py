import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import frames, write_npy
from trainer.contract.labels import label_from_path
from trainer.contract.layout import SYNTHETIC_MARKER as MARKER
from trainer.ml.cli import main
from trainer.ml.data import load_dataset


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    for i, emo in enumerate(["HAP", "SAD", "ANG"]):
        write_npy(tmp_path / f"cremad_10{i:02d}_TSI_{emo}_XX.npy", frames(3 + i, 8, seed=i))
    write_npy(tmp_path / "ravdess_03-01-02-01-01-01-05.npy", frames(2, 8))
    write_npy(tmp_path / "ravdess_03-01-08-01-01-01-05.npy", frames(2, 8))
    write_npy(tmp_path / "mystery.npy", frames(2, 8))
    (tmp_path / "broken_cremad_1001_TSI_HAP_XX.npz").write_bytes(b"nope")
    (tmp_path / "cremad_1009_TSI_SAD_XX.npz").write_bytes(b"nope")
    write_npy(tmp_path / "wav2vec_mean.npy", np.zeros(8, np.float32))
    write_npy(tmp_path / "wav2vec_std.npy", np.ones(8, np.float32))
    return tmp_path


def test_check_data_json(capsys, mixed_dir: Path) -> None:
    code, out, _ = run(capsys, "check-data", str(mixed_dir), "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["usable"] == 4 and rep["skipped"] == 4
    assert rep["files"] == {"npy": 6, "npz": 2, "stats": 2}
    assert rep["patterns"] == {"cremad": 4, "ravdess": 2, "none": 2}
    assert rep["labels"] == {"cremad": {"angry": 1, "happy": 1, "sad": 1}, "ravdess": {"calm": 1}}
    assert rep["speakers"] == {"cremad": 3, "ravdess": 1}
    assert rep["array_keys"] == {"npy": 4} and rep["shapes"] == {"(T, 8)": 4}
    assert rep["feature_shape"] == [8] and rep["frames"] == {"min": 2, "median": 3.5, "max": 5}
    assert {k: v["count"] for k, v in rep["skip_reasons"].items()} == {
        "unrecognized_name": 2, "label_not_in_classes": 1, "unreadable": 1}
    assert rep["skip_reasons"]["label_not_in_classes"]["examples"] == [
        "ravdess_03-01-08-01-01-01-05.npy (surprise)"]
    assert set(rep["unrecognized_examples"]) == {"broken_cremad_1001_TSI_HAP_XX.npz", "mystery.npy"}
    assert rep["stats_files"] == {
        "found": True, "dir": str(mixed_dir.resolve()), "valid": True, "problem": None}


def test_check_data_reports_bad_stats(capsys, mixed_dir: Path) -> None:
    np.save(mixed_dir / "wav2vec_std.npy", np.ones(3, np.float32))
    code, out, _ = run(capsys, "check-data", str(mixed_dir), "--json")
    assert code == 0
    stats = json.loads(out)["stats_files"]
    assert stats["found"] and not stats["valid"] and "does not match" in stats["problem"]


def test_check_data_tables(capsys, mixed_dir: Path) -> None:
    code, out, _ = run(capsys, "check-data", str(mixed_dir))
    assert code == 0
    for text in ("Usable samples by label (4 in all)", "cremad (3 speakers)", "unrecognized_name",
                 "not recognised: mystery.npy", "Skipped files (4)", "found and valid"):
        assert text in out, text


def test_check_data_exit_codes(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "check-data", str(tmp_path / "nowhere"))
    assert code == 13 and err.count("\n") == 1 and "does not exist" in err
    code, _, err = run(capsys, "check-data", str(tmp_path))
    assert code == 13 and "no .npz/.npy feature files found" in err
    write_npy(tmp_path / "x.npy", frames(2, 8))
    code, out, err = run(capsys, "check-data", str(tmp_path), "--json")
    assert code == 13 and json.loads(out)["usable"] == 0
    assert err.startswith("trainer: error: no usable feature files") and err.count("\n") == 1


def test_synth_writes_realistic_labelled_synthetic_data(capsys, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "synth", str(tmp_path), "--n", "300", "--dim", "768",
                       "--min-frames", "5", "--max-frames", "9", "--dtype", "float16")
    assert code == 0 and "SYNTHETIC" in out
    assert "SYNTHETIC" in (tmp_path / MARKER).read_text()
    files = [p for p in tmp_path.iterdir() if p.suffix in (".npz", ".npy")]
    assert len(files) == 300
    infos = [label_from_path(p.name) for p in files]
    assert {i.corpus for i in infos} == {"ravdess", "cremad"}
    assert all(i.label is not None for i in infos)
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.feature_shape == (768,)
    assert set(ds.scan.array_keys) == {"emb", "embedding", "features", "wav2vec", "npy"}
    lengths = ds.lengths()
    assert lengths.min() >= 5 and lengths.max() <= 9 and len(set(lengths)) > 1
    labels = [s.label for s in ds.samples]
    assert set(labels) == {"neutral", "calm", "happy", "sad", "angry", "fear", "disgust"}
    assert labels.count("calm") * 3 < labels.count("happy")  # calm is the rare class
    assert {r.reason.value for r in ds.skipped} <= {"label_not_in_classes"}  # surprise only
    assert len({s.speaker for s in ds.samples}) >= 4
    assert np.load(files[0]).__class__.__name__ in ("NpzFile", "ndarray")


def test_synth_rejects_bad_options(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "synth", str(tmp_path), "--n", "0")
    assert code == 2 and err.startswith("trainer: error: argument --n: must be a positive integer")
    assert err.count("\n") == 1


def test_help_says_synthetic(capsys) -> None:
    assert main(["synth", "--help"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out


def _pooled_accuracy(ds, target: np.ndarray, layer: int | None = None) -> float:
    """Cross-validated accuracy of a logistic regression on mean-pooled features (files mixed)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.preprocessing import StandardScaler

    def frames_of(i: int) -> np.ndarray:
        x = ds.sequence(i).astype(np.float32)
        return x if layer is None else x[:, layer]

    x = StandardScaler().fit_transform(np.stack([frames_of(i).mean(axis=0) for i in range(len(ds))]))
    return float(cross_val_score(LogisticRegression(max_iter=2000, C=0.1), x, target, cv=3).mean())


def test_synth_shows_the_properties_of_real_features(tmp_path: Path) -> None:
    """More speaker than emotion information, feature scales over 30x, calm ~7x rarer, and a
    difficulty knob that sets how much emotion there is."""
    from trainer.ml.synth import synth

    synth(tmp_path / "d1", n=700, dim=32, seed=0)
    ds = load_dataset(tmp_path / "d1", use_cache=False)
    speakers = np.unique([f"{s.corpus}:{s.speaker}" for s in ds.samples], return_inverse=True)[1]
    emotion = _pooled_accuracy(ds, ds.label_ids())
    assert _pooled_accuracy(ds, speakers) > emotion + 0.3
    std = np.asarray(ds.frames, dtype=np.float32).std(axis=0)
    assert std.max() / std.min() > 30
    labels = [s.label for s in ds.samples]
    assert 4 < labels.count("sad") / labels.count("calm") < 14
    # The default is hard for pooled features; below 1 the difficulty gives the emotion back.
    synth(tmp_path / "easier", n=700, dim=32, seed=0, difficulty=0.4)
    easier = load_dataset(tmp_path / "easier", use_cache=False)
    assert _pooled_accuracy(easier, easier.label_ids()) > emotion + 0.1


def test_synth_layers_carry_emotion_in_the_upper_middle(tmp_path: Path) -> None:
    from trainer.ml.synth import synth

    summary = synth(tmp_path, n=500, dim=16, seed=1, layers=5, min_frames=10, max_frames=20)
    ds = load_dataset(tmp_path, use_cache=False)
    assert summary.feature_shape == ds.feature_shape == (5, 16)
    by_layer = [_pooled_accuracy(ds, ds.label_ids(), layer) for layer in range(5)]
    assert int(np.argmax(by_layer)) in (2, 3) and by_layer[0] < max(by_layer) - 0.1
