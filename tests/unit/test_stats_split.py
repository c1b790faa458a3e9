import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import frames, write_npy
from trainer.ml.data import load_dataset
from trainer.ml.errors import DataError, UsageError
from trainer.ml.split import load_split, make_split, save_split
from trainer.ml.stats import compute_stats, find_stats, load_stats, save_stats
from trainer.ml.synth import synth

EMOS = ["NEU", "HAP", "SAD", "ANG", "FEA", "DIS"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """6 classes x 8 CREMA-D speakers x 3 takes + 2 RAVDESS actors, small D."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for spk in range(8):
        for e, emo in enumerate(EMOS):
            for take in range(3):
                x = rng.standard_normal((4 + take, 6)).astype(np.float32) + e
                write_npy(root / f"cremad_{1001 + spk}_{('TIE', 'IEO', 'DFA')[take]}_{emo}_XX", x)
    for actor in (1, 2):
        for code in ("01", "02", "03", "04"):
            write_npy(root / f"ravdess_03-01-{code}-01-01-01-{actor:02d}", frames(3, 6, seed=actor))
    return load_dataset(root, use_cache=False)


def test_stats_use_training_samples_only(corpus) -> None:
    split = make_split(corpus, "random", 0.25, seed=1)
    stats = compute_stats(corpus, split.train)
    train = np.concatenate([corpus.sequence(i) for i in split.train]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, train.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, train.std(axis=0), rtol=1e-4)
    everything = np.concatenate([corpus.sequence(i) for i in range(len(corpus))]).astype(np.float64)
    assert not np.allclose(stats.mean, everything.mean(axis=0), atol=1e-4)


def test_stats_roundtrip_and_checks(tmp_path: Path, corpus) -> None:
    stats = compute_stats(corpus, np.arange(len(corpus)))
    save_stats(stats, tmp_path)
    assert find_stats(tmp_path) == tmp_path
    loaded = load_stats(tmp_path, corpus.feature_shape)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.std, stats.std)
    np.save(tmp_path / "wav2vec_mean.npy", np.zeros((1, 6), np.float32))  # old (1, D) layout: fine
    assert load_stats(tmp_path, corpus.feature_shape).mean.shape == (6,)
    np.save(tmp_path / "wav2vec_mean.npy", np.zeros(5, np.float32))
    with pytest.raises(DataError, match=r"shape \(5,\) does not match"):
        load_stats(tmp_path, corpus.feature_shape)
    np.save(tmp_path / "wav2vec_mean.npy", np.full(6, np.nan, np.float32))
    with pytest.raises(DataError, match="NaN or Inf"):
        load_stats(tmp_path, corpus.feature_shape)
    np.save(tmp_path / "wav2vec_mean.npy", np.zeros(6, np.float32))
    np.save(tmp_path / "wav2vec_std.npy", np.zeros(6, np.float32))
    with pytest.raises(DataError, match="zero or negative"):
        load_stats(tmp_path, corpus.feature_shape)
    (tmp_path / "wav2vec_std.npy").unlink()
    assert find_stats(tmp_path) is None


def test_constant_features_get_a_safe_std(tmp_path: Path) -> None:
    write_npy(tmp_path / "cremad_1001_TSI_HAP_XX.npy", frames(3, 4, value=2.0))
    ds = load_dataset(tmp_path, use_cache=False)
    stats = compute_stats(ds, np.array([0]))
    assert (stats.std > 0).all() and np.isfinite(stats.normalize(ds.sequence(0))).all()


def test_random_split_is_stratified_and_seeded(corpus) -> None:
    a = make_split(corpus, "random", 0.25, seed=3)
    b = make_split(corpus, "random", 0.25, seed=3)
    c = make_split(corpus, "random", 0.25, seed=4)
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)
    assert set(a.train).isdisjoint(a.val) and len(a.train) + len(a.val) == len(corpus)
    labels = corpus.label_ids()
    for k in np.unique(labels):
        n = (labels == k).sum()
        n_val = (labels[a.val] == k).sum()
        assert 1 <= n_val <= n - 1 and abs(n_val - 0.25 * n) <= 1


def test_speaker_split_shares_no_speaker_and_keeps_classes(corpus) -> None:
    for seed in range(5):
        split = make_split(corpus, "speaker", 0.25, seed=seed)
        spk = [(s.corpus, s.speaker) for s in corpus.samples]
        train_spk = {spk[i] for i in split.train}
        val_spk = {spk[i] for i in split.val}
        assert train_spk.isdisjoint(val_spk)
        assert len(split.train) + len(split.val) == len(corpus)
        # Whole CREMA-D speakers carry every class, so validation sees all six.
        val_labels = {corpus.samples[i].label for i in split.val}
        assert {"neutral", "happy", "sad", "angry", "fear", "disgust"} <= val_labels
        assert 0.1 < len(split.val) / len(corpus) < 0.4


def test_speaker_split_needs_two_speakers(tmp_path: Path) -> None:
    for e in EMOS[:2]:
        write_npy(tmp_path / f"cremad_1001_TIE_{e}_XX.npy", frames(2, 4))
    ds = load_dataset(tmp_path, use_cache=False)
    with pytest.raises(DataError, match="at least 2 speakers"):
        make_split(ds, "speaker", 0.2, seed=0)
    with pytest.raises(UsageError):
        make_split(ds, "random", 1.5, seed=0)
    with pytest.raises(UsageError):
        make_split(ds, "alphabetical", 0.2, seed=0)


def test_split_file_roundtrip_reproduces_the_split(tmp_path: Path, corpus) -> None:
    split = make_split(corpus, "speaker", 0.25, seed=2)
    save_split(split, corpus, tmp_path / "split.json")
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["method"] == "speaker" and len(doc["validation"]) == len(split.val)
    again, missing = load_split(tmp_path / "split.json", corpus)
    assert missing == []
    np.testing.assert_array_equal(np.sort(again.train), np.sort(split.train))
    np.testing.assert_array_equal(np.sort(again.val), np.sort(split.val))


def test_synth_speaker_split_is_harder_than_random(tmp_path: Path) -> None:
    """The synthetic speaker effect: a linear model on mean-pooled features does well on
    speakers it has seen and much worse on unseen ones."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    synth(tmp_path, n=900, dim=32, seed=0)
    ds = load_dataset(tmp_path, use_cache=False)
    x = np.stack([ds.sequence(i).astype(np.float32).mean(axis=0) for i in range(len(ds))])
    y = ds.label_ids()

    def accuracy(method: str) -> float:
        split = make_split(ds, method, 0.2, seed=0)
        scale = StandardScaler().fit(x[split.train])
        clf = LogisticRegression(max_iter=2000).fit(scale.transform(x[split.train]), y[split.train])
        return float(clf.score(scale.transform(x[split.val]), y[split.val]))

    random_acc, speaker_acc = accuracy("random"), accuracy("speaker")
    assert random_acc > 1.0 / len(ds.classes) + 0.15  # learnable
    assert speaker_acc < random_acc - 0.1  # and clearly harder across speakers
