"""How the model is fitted: the optimizer is built before the first step (one trace of it, not
two), and the weight average is swapped exactly and twice an epoch."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

from trainer.ml.config import Architecture, TrainConfig  # noqa: E402
from trainer.ml.fitting import AveragedWeightsAtEpochEnd, compile_model  # noqa: E402
from trainer.ml.model import build_model  # noqa: E402
from trainer.ml.stats import Stats  # noqa: E402

CLASSES = ("angry", "happy", "neutral")


def model_and_config() -> tuple[keras.Model, TrainConfig]:
    cfg = TrainConfig(data_dir="d", run_dir="r", classes=CLASSES, epochs=3,
                      architecture=Architecture(hidden=8, attention=4))
    model = build_model(cfg.architecture, Stats(np.zeros(4, np.float32), np.ones(4, np.float32)), len(CLASSES))
    compile_model(model, cfg, steps_per_epoch=2)
    return model, cfg


def data(n: int = 8, t: int = 6) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    x = {"frames": rng.standard_normal((n, t, 4)).astype(np.float32), "lengths": np.full(n, t, np.int32)}
    return x, np.eye(len(CLASSES), dtype=np.float32)[rng.integers(0, len(CLASSES), n)]


def test_the_optimizer_is_built_before_the_first_step_so_the_step_is_traced_once() -> None:
    # Slots created inside the first step made TensorFlow trace the whole step twice.
    model, _ = model_and_config()
    assert model.optimizer.built and len(model.optimizer.variables) > len(model.trainable_variables)
    traces = []
    step = model.train_step
    model.train_step = lambda batch: (traces.append(1), step(batch))[1]
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert len(traces) == (1 if keras.backend.backend() == "tensorflow" else len(traces))
    assert traces


class CountingSwaps(AveragedWeightsAtEpochEnd):
    def __init__(self) -> None:
        super().__init__(averaged_in_model=False)
        self.swaps = 0

    def _swap_variables(self) -> None:
        self.swaps += 1
        super()._swap_variables()


def slot_pairs(model: keras.Model) -> list[tuple[object, object]]:
    optimizer = model.optimizer
    return list(zip(optimizer._trainable_variables, optimizer._model_variables_moving_average, strict=True))


def test_a_swap_gives_back_the_same_bits_even_where_a_float_sum_would_not() -> None:
    model, _ = model_and_config()
    callback = AveragedWeightsAtEpochEnd(averaged_in_model=False)
    callback.set_model(model)
    pairs = slot_pairs(model)
    for k, (weight, average) in enumerate(pairs):
        # a + b - b is not a when b is 1e8 times a: Keras's arithmetic swap loses a.
        weight.assign(np.full(weight.shape, 1e-8 * (k + 1), np.float32))
        average.assign(np.full(average.shape, 1e8, np.float32))
    raw = [keras.ops.convert_to_numpy(w).copy() for w, _ in pairs]
    callback._swap_variables()
    for (weight, average), before in zip(pairs, raw, strict=True):
        assert (keras.ops.convert_to_numpy(weight) == 1e8).all()
        assert np.array_equal(keras.ops.convert_to_numpy(average), before)
    callback._swap_variables()
    for (weight, _), before in zip(pairs, raw, strict=True):
        assert np.array_equal(keras.ops.convert_to_numpy(weight), before)


def test_a_fit_swaps_twice_an_epoch_and_validates_and_ends_each_epoch_with_the_average() -> None:
    model, _ = model_and_config()
    swaps = CountingSwaps()
    seen: list[tuple[str, list[np.ndarray], list[np.ndarray]]] = []

    class Probe(keras.callbacks.Callback):
        def _look(self, when: str) -> None:
            weights = [keras.ops.convert_to_numpy(w).copy() for w, _ in slot_pairs(model)]
            slots = [keras.ops.convert_to_numpy(a).copy() for _, a in slot_pairs(model)]
            seen.append((when, weights, slots))

        def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            self._look("validating")

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self._look("epoch end")

    x, y = data()
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, validation_data=data(4), callbacks=[swaps, Probe()])
    assert swaps.swaps == 2 * 3 - 1  # in for validation (and the epoch's end), out as the next begins
    # Validation and the epoch's end see the same (averaged) weights, the slots the raw ones.
    validating = [s for s in seen if s[0] == "validating"]
    ends = [s for s in seen if s[0] == "epoch end"]
    assert len(validating) == len(ends) == 3
    for (_, w_val, s_val), (_, w_end, s_end) in zip(validating, ends, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(w_val, w_end, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(s_val, s_end, strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(w_end, s_end, strict=True))


def test_in_mixed_float16_the_loss_scale_is_built_and_a_checkpoint_brings_it_back(tmp_path: Path) -> None:
    # compile() wraps the optimizer in a LossScaleOptimizer: building the inner one alone left
    # the wrapper's loss scale out of a checkpoint's load (a continued run restarted it at 2^15).
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, _ = model_and_config()
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) and model.optimizer.built
        model.optimizer.dynamic_scale.assign(512.0)
        model.optimizer.step_counter.assign(7)
        path = tmp_path / "epoch.weights.h5"
        model.save_weights(path)
        again, _ = model_and_config()
        again.load_weights(path)
        assert float(keras.ops.convert_to_numpy(again.optimizer.dynamic_scale)) == 512.0
        assert int(keras.ops.convert_to_numpy(again.optimizer.step_counter)) == 7
    finally:
        keras.mixed_precision.set_global_policy("float32")
