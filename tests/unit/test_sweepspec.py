"""A sweep's SPEC.yaml: checked against the trainer's options contract before anything
connects; every problem is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError
from orchestrator.sweepspec import SweepSpec, load_spec

SPEC = {"name": "lr-width", "trials": 4,
        "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "hidden": {"choices": [8, 16, 8]},
                  "split": {"choices": ["speaker", "random"]}, "batch_size": {"low": 8, "high": 32, "step": 8}},
        "pruner": "median", "budget": {"instance_hours": 2}, "train": {"epochs": "3"}}


def write(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return path


def test_a_good_spec_reads_with_its_values_converted_and_defaults_filled(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path))
    assert spec.train == {"epochs": 3}  # the option's own type
    assert spec.space["hidden"].choices == [8, 16]  # once each
    assert (spec.space["batch_size"].low, spec.space["batch_size"].high) == (8, 32)
    assert isinstance(spec.space["batch_size"].low, int)
    assert spec.pruner is not None and spec.pruner.kind == "median" and spec.pruner.startup_trials == 5
    assert spec.maximize and spec.metric == "val_accuracy" and spec.parallel == 1
    cfg = DeployConfig.model_validate({"target": "local", "base_dir": tmp_path})
    assert spec.storage_url(cfg) == f"sqlite:///{tmp_path.resolve() / 'sweeps.db'}"
    assert not load_spec(write(tmp_path, objective="val_loss")).maximize  # a loss is minimized
    assert load_spec(write(tmp_path, objective="val_loss", direction="maximize")).maximize


@pytest.mark.parametrize("changes, message", [
    ({"space": {"learnig_rate": {"low": 1e-4, "high": 1e-2}}},
     "space.learnig_rate: unknown trainer option (did you mean learning_rate?)"),
    ({"space": {"learning_rate": {"low": 1e-4, "high": 20}}}, "space.learning_rate.high: must be a number > 0 and <= 10, got 20"),
    ({"space": {"learning_rate": {"low": 0, "high": 1}}}, "space.learning_rate.low: must be a number > 0"),
    ({"space": {"hidden": {"low": 8.5, "high": 20}}}, "space.hidden.low: must be an integer >= 1 and <= 65536, got 8.5"),
    ({"space": {"hidden": {"choices": [8, 0]}}}, "space.hidden.choices: must be an integer >= 1 and <= 65536, got 0"),
    ({"space": {"split": {"low": 1, "high": 2}}}, "space.split: split is one of speaker, random: give {choices: [...]}"),
    ({"space": {"dropout": {"low": 0.5, "high": 0.1}}}, "space.dropout: low (0.5) must be below high (0.1)"),
    ({"space": {"weight_decay": {"low": 0, "high": 0.1, "log": True}}}, "space.weight_decay.low: a log scale needs low > 0"),
    ({"space": {"hidden": {"lo": 8, "high": 16}}}, "space.hidden.lo: unknown key (did you mean low?)"),
    ({"space": {"hidden": {"low": 8, "high": 16, "choices": [8]}}}, "space.hidden: give {low, high} or {choices}, not both"),
    ({"space": {"init_from": {"choices": ["x"]}}}, "space.init_from: set by orch itself, not by a sweep"),
    ({"space": {"epochs": {"low": 2, "high": 3}}}, "space.epochs: also given in train:"),
    ({"space": {}}, "space: Dictionary should have at least 1 item"),
    ({"train": {"epochs": 0}}, "train.epochs: must be an integer >= 1 and <= 1000000, got 0"),
    ({"train": {"hiden": 8}}, "train.hiden: unknown trainer option (did you mean hidden?)"),
    ({"budget": {}}, "budget: give instance_hours or usd"),
    ({"pruner": "lazy"}, "pruner.kind: Input should be 'median' or 'hyperband'"),
    ({"trails": 3}, "trails: unknown key (did you mean trials?)"),
    ({"name": "a/b"}, "name: String should match pattern"),
])
def test_a_bad_spec_is_one_line_naming_the_key(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_spec(write(tmp_path, **changes))
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'sweep.yaml'}: ") and message in text and "\n" not in text


def test_every_field_is_described_for_the_schema() -> None:
    def fields(model: type) -> list[tuple[str, object]]:
        return [(name, f.description) for name, f in model.model_fields.items()]

    from orchestrator.sweepspec import Budget, Dimension, PrunerSpec

    for model in (SweepSpec, Dimension, PrunerSpec, Budget):
        assert all(description for _name, description in fields(model)), model
