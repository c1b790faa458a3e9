"""The Keras model: padding never counts, weights load into a fresh model, all layer shapes."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

from trainer.ml.config import Architecture  # noqa: E402
from trainer.ml.model import WarmupCosine, build_model  # noqa: E402

ARCH = Architecture(hidden=16, attention=8, dropout=0.2)


@pytest.mark.parametrize("feature_shape", [(12,), (3, 12)])
def test_padding_never_counts(feature_shape: tuple[int, ...]) -> None:
    model = build_model(ARCH, feature_shape, 4)
    rng = np.random.default_rng(0)
    seq = rng.standard_normal((2, 5, *feature_shape)).astype(np.float32)
    lengths = np.array([5, 3], np.int32)
    short = model.predict_on_batch({"frames": seq, "lengths": lengths})
    padded = np.concatenate([seq, 100 * rng.standard_normal((2, 11, *feature_shape)).astype(np.float32)], 1)
    padded[1, 3:5] = -50.0  # garbage beyond the second sequence's length too
    long = model.predict_on_batch({"frames": padded, "lengths": lengths})
    np.testing.assert_allclose(short, long, rtol=1e-5, atol=1e-5)
    assert short.shape == (2, 4)


@pytest.mark.parametrize("feature_shape", [(12,), (3, 12)])
def test_weights_load_into_a_freshly_built_model(tmp_path, feature_shape: tuple[int, ...]) -> None:
    model = build_model(ARCH, feature_shape, 4)
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x = {"frames": np.random.default_rng(1).standard_normal((8, 6, *feature_shape)).astype(np.float32),
         "lengths": np.full(8, 6, np.int32)}
    model.fit(x, np.eye(4, dtype=np.float32)[np.arange(8) % 4], verbose=0, epochs=2)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    fresh = build_model(ARCH, feature_shape, 4)
    fresh.load_weights(path)
    np.testing.assert_allclose(model.predict_on_batch(x), fresh.predict_on_batch(x), rtol=1e-6)
    names = {w.path for w in model.weights}
    assert any("layer_logits" in n for n in names) == (len(feature_shape) == 2)
    # The custom layers serialize (config round-trip through Keras' registry).
    clone = keras.Model.from_config(model.get_config())
    assert [type(layer).__name__ for layer in clone.layers] == [type(layer).__name__ for layer in model.layers]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras warns about each layer it skips
def test_a_different_architecture_does_not_load(tmp_path) -> None:
    model = build_model(ARCH, (12,), 4)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    other = build_model(Architecture(hidden=32, attention=8), (12,), 4)
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
