"""The Keras model: padding never counts, weights load into a fresh model, all layer shapes; the
in-graph augmentation: off at inference, padding-neutral, reproducible from its generators'
states, the noise's spread, frame dropout removing a share of the valid frames and never all of them, mixup mixing inputs,
labels and weights alike."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

from trainer.ml import trainstate  # noqa: E402
from trainer.ml.config import Architecture  # noqa: E402
from trainer.ml.model import (  # noqa: E402
    AttentiveStatsPooling,
    Augmentation,
    FeatureNoise,
    FrameDropout,
    WarmupCosine,
    build_model,
)
from trainer.ml.stats import Stats  # noqa: E402

ARCH = Architecture(hidden=16, attention=8, dropout=0.2)
AUG = Augmentation(frame_dropout=0.5, noise=0.3, mixup=0.4)


def stats(feature_shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0) -> Stats:
    return Stats(np.full(feature_shape, mean, np.float32), np.full(feature_shape, std, np.float32))


def batch(feature_shape: tuple[int, ...], t: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"frames": rng.standard_normal((2, t, *feature_shape)).astype(np.float32),
            "lengths": np.array([t, 3], np.int32)}


@pytest.mark.parametrize("feature_shape", [(12,), (3, 12)])
def test_padding_never_counts(feature_shape: tuple[int, ...]) -> None:
    model = build_model(ARCH, stats(feature_shape, 0.5, 2.0), 4)
    rng = np.random.default_rng(0)
    x = batch(feature_shape)
    short = model.predict_on_batch(x)
    padded = np.concatenate([x["frames"], 100 * rng.standard_normal((2, 11, *feature_shape)).astype(np.float32)], 1)
    padded[1, 3:5] = -50.0  # garbage beyond the second sequence's length too
    long = model.predict_on_batch({"frames": padded, "lengths": x["lengths"]})
    np.testing.assert_allclose(short, long, rtol=1e-5, atol=1e-5)
    assert short.shape == (2, 4)


def test_the_model_normalizes_with_the_statistics_it_was_built_with() -> None:
    x = batch((12,))
    shifted = {"frames": 3.0 + 2.0 * x["frames"], "lengths": x["lengths"]}
    plain = build_model(ARCH, stats((12,)), 4)
    scaled = build_model(ARCH, stats((12,), 3.0, 2.0), 4)
    scaled.set_weights(plain.get_weights())
    np.testing.assert_allclose(plain.predict_on_batch(x), scaled.predict_on_batch(shifted), rtol=1e-4, atol=1e-5)
    # float16 frames from the host: the same answer (to float16's precision)
    half = {"frames": x["frames"].astype(np.float16), "lengths": x["lengths"]}
    np.testing.assert_allclose(plain.predict_on_batch(x), plain.predict_on_batch(half), atol=2e-3)


@pytest.mark.parametrize("feature_shape", [(12,), (3, 12)])
def test_augmentation_is_off_at_inference(feature_shape: tuple[int, ...]) -> None:
    """An augmented model predicts exactly what the same weights without augmentation do, and
    leaves its generators alone; in training the same batch gives other outputs each call."""
    augmented = build_model(ARCH, stats(feature_shape), 4, augmentation=AUG)
    plain = build_model(ARCH, stats(feature_shape), 4)
    plain.set_weights(augmented.get_weights())
    x = batch(feature_shape, t=16)
    before = trainstate.values(trainstate.rng_variables(augmented))
    np.testing.assert_allclose(augmented.predict_on_batch(x), plain.predict_on_batch(x), rtol=1e-6)
    assert trainstate.values(trainstate.rng_variables(augmented)) == before
    first, second = (keras.ops.convert_to_numpy(augmented(x, training=True)) for _ in range(2))
    assert not np.allclose(first, second)


def test_training_outputs_are_padding_neutral_and_follow_the_generators_states() -> None:
    """Training-mode outputs depend on the batch and the generators' states alone (what a
    checkpoint commits): not on what the padding holds."""
    model = build_model(Architecture(hidden=16, attention=8, dropout=0.0), stats((12,)), 4,
                        augmentation=Augmentation(frame_dropout=0.5, noise=0.3))
    generators = trainstate.rng_variables(model)
    start = trainstate.values(generators)
    x = batch((12,), t=16)
    garbage = {"frames": x["frames"].copy(), "lengths": x["lengths"]}
    garbage["frames"][1, 3:] = 1e3
    a = keras.ops.convert_to_numpy(model(x, training=True))
    after_one = trainstate.values(generators)
    trainstate.assign(generators, start, "generators")
    b = keras.ops.convert_to_numpy(model(garbage, training=True))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert trainstate.values(generators) == after_one  # the same draws moved them the same way
    c = keras.ops.convert_to_numpy(model(x, training=True))  # the next draws: other frames, other noise
    assert not np.allclose(a, c)


def test_feature_noise_has_the_standard_deviation_asked_and_sums_to_gaussian() -> None:
    """Training adds zero-mean noise of the asked standard deviation, within +-sqrt(3) of it
    (uniform); a linear layer's sum of 768 of its draws is Gaussian (no excess kurtosis);
    inference adds nothing."""
    x = np.full((64, 48, 768), 2.0, np.float32)
    layer = FeatureNoise(0.3, seed=3)
    noise = keras.ops.convert_to_numpy(layer(x, training=True)) - x
    assert abs(noise.mean()) < 0.002 and abs(noise.std() - 0.3) < 0.002
    assert np.abs(noise).max() <= 0.3 * np.sqrt(3.0) + 1e-6
    sums = noise.reshape(-1, 768) @ np.random.default_rng(0).standard_normal((768, 16)).astype(np.float32)
    z = (sums - sums.mean(0)) / sums.std(0)
    assert abs((z**4).mean() - 3.0) < 0.15  # a uniform's own is 1.8: the sums are Gaussian
    assert np.array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)


def test_frame_dropout_removes_a_share_of_the_valid_frames_and_always_keeps_one() -> None:
    lengths = np.array([1, 2, 7, 400, 400], np.int32)
    frames = np.full((5, 400, 3), -1.0, np.float32)  # padding: -1
    for row, length in enumerate(lengths):
        frames[row, :length, 0] = np.arange(length)  # each valid frame carries its index
    x, keep = (keras.ops.convert_to_numpy(t) for t in FrameDropout(0.5, seed=1)(frames, lengths, training=True))
    assert x.shape == (5, 200, 3) and keep.shape == (5, 200)  # ceil(0.5 * 400) slots: half the work after it
    kept = [x[row, keep[row] > 0, 0] for row in range(5)]
    for row, frames_kept in enumerate(kept):
        assert len(np.unique(frames_kept)) == len(frames_kept)  # each frame once
        assert ((frames_kept >= 0) & (frames_kept < lengths[row])).all()  # valid frames only, never padding
    assert [len(k) for k in kept[:2]] == [1, 1] and len(kept[2]) in (3, 4) and [len(k) for k in kept[3:]] == [200, 200]
    assert not np.array_equal(np.sort(kept[3]), np.sort(kept[4]))  # a choice of its own per row
    almost_all, keep = (keras.ops.convert_to_numpy(t) for t in FrameDropout(0.999, seed=2)(frames, lengths, training=True))
    assert almost_all.shape[1] == 1 and keep.sum(axis=1).tolist() == [1, 1, 1, 1, 1]
    # The share is exact on average (stochastic rounding): 7 frames at rate 0.5 keep 3.5.
    _, keep = FrameDropout(0.5, seed=3)(np.zeros((4000, 8, 1), np.float32), np.full(4000, 7, np.int32), training=True)
    assert abs(float(keras.ops.convert_to_numpy(keep).sum(axis=1).mean()) - 3.5) < 0.05
    same, valid = (keras.ops.convert_to_numpy(t) for t in FrameDropout(0.5)(frames, lengths))  # inference: nothing
    np.testing.assert_array_equal(same, frames)
    np.testing.assert_array_equal(valid, (np.arange(400)[None, :] < lengths[:, None]).astype(np.float32))


def test_the_pooling_ignores_the_frames_its_mask_leaves_out() -> None:
    """Pooling over a mask is pooling over the kept frames alone (padding, dropped slots)."""
    pool = AttentiveStatsPooling(4)
    x = np.random.default_rng(3).standard_normal((1, 10, 6)).astype(np.float32)
    keep = np.array([[1, 0, 0, 1, 1, 0, 1, 0, 0, 0]], np.float32)
    masked = keras.ops.convert_to_numpy(pool(x, keep))
    removed = keras.ops.convert_to_numpy(pool(x[:, keep[0] > 0], np.ones((1, 4), np.float32)))
    np.testing.assert_allclose(masked, removed, rtol=1e-5, atol=1e-6)


def test_mixup_mixes_inputs_labels_and_weights_alike() -> None:
    model = build_model(ARCH, stats((2,), mean=-7.0), 4, augmentation=Augmentation(mixup=0.4))
    lengths = np.array([8, 3, 5, 8], np.int32)
    x = {"frames": np.stack([np.full((8, 2), k, np.float32) for k in range(4)]), "lengths": lengths}
    y = np.eye(4, dtype=np.float32)
    mixed_any = False
    # A draw may pair every sequence with itself (1 in 24 for 4): every draw must hold the
    # invariants, and among several draws one must have mixed something.
    for _ in range(6):
        mixed_x, labels, weights = model.mix((x, y, np.arange(4, dtype=np.float32)))
        frames, mixed_lengths = (keras.ops.convert_to_numpy(mixed_x[k]) for k in ("frames", "lengths"))
        labels, weights = keras.ops.convert_to_numpy(labels), keras.ops.convert_to_numpy(weights)
        mixed_any |= not np.allclose(labels, y)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(weights, labels @ np.arange(4), rtol=1e-5)  # weights mixed as the labels
        for t in range(8):
            # Sequence k's frame t is k, or past its end the mean frame (-7: zero once normalized).
            value = np.where(lengths > t, np.arange(4), -7.0)
            mixed = np.flatnonzero(t < mixed_lengths)
            np.testing.assert_allclose(frames[mixed, t, 0], (labels @ value)[mixed], rtol=1e-5, atol=1e-5)
        for row in range(4):  # as long as the longer of the two (row's own label is class row)
            partners = [p for p in range(4) if p != row and labels[row, p] > 1e-6]
            # Beta(0.4, 0.4) puts mass near 1: the partner's share may round below any threshold
            # (about 1 row in 400), and then only its length says which it was.
            candidates = {max(lengths[row], lengths[p]) for p in (partners or range(4))}
            assert mixed_lengths[row] in candidates and len(partners) <= 1
    assert mixed_any  # something was mixed


@pytest.mark.parametrize("feature_shape", [(12,), (3, 12)])
def test_weights_load_into_a_freshly_built_model(tmp_path, feature_shape: tuple[int, ...]) -> None:
    model = build_model(ARCH, stats(feature_shape), 4, augmentation=AUG)
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x = {"frames": np.random.default_rng(1).standard_normal((8, 6, *feature_shape)).astype(np.float16),
         "lengths": np.full(8, 6, np.int32)}
    model.fit(x, np.eye(4, dtype=np.float32)[np.arange(8) % 4], verbose=0, epochs=2)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    fresh = build_model(ARCH, stats(feature_shape), 4)  # as `trainer predict` builds it: no augmentation
    fresh.load_weights(path)
    np.testing.assert_allclose(model.predict_on_batch(x), fresh.predict_on_batch(x), rtol=1e-6)
    names = {w.path for w in model.weights}
    assert any("layer_logits" in n for n in names) == (len(feature_shape) == 2)
    # The custom layers serialize (config round-trip through Keras' registry).
    clone = keras.Model.from_config(model.get_config())
    assert [type(layer).__name__ for layer in clone.layers] == [type(layer).__name__ for layer in model.layers]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras warns about each layer it skips
def test_a_different_architecture_does_not_load(tmp_path) -> None:
    model = build_model(ARCH, stats((12,)), 4)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    other = build_model(Architecture(hidden=32, attention=8), stats((12,)), 4)
    with pytest.raises((ValueError, KeyError)):
        other.load_weights(path)


def test_warmup_cosine_schedule() -> None:
    sched = WarmupCosine(1e-3, warmup_steps=10, total_steps=110, floor=0.1)
    values = [float(keras.ops.convert_to_numpy(sched(s))) for s in (0, 4, 9, 10, 60, 110, 500)]
    assert values[0] == pytest.approx(1e-4) and values[2] == pytest.approx(1e-3)
    assert values[1] < values[2] and values[3] == pytest.approx(1e-3)
    assert values[4] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-4)
    assert values[5] == pytest.approx(1e-4) and values[6] == pytest.approx(1e-4)
    assert WarmupCosine.from_config(sched.get_config()).get_config() == sched.get_config()
