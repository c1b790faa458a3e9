"""A sweep's SPEC.yaml: a pydantic model (unknown keys are errors, every field described),
its search space checked against the trainer's options contract (trainer/contract/options.py)
before anything connects. Optuna itself is not imported here (orchestrator/sweep.py runs it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from orchestrator.config import DeployConfig, first_problem
from orchestrator.errors import ConfigError
from trainer.contract import options

# What a trial can be judged by: the run's recorded best (its best checkpoint's validation
# accuracy), or the best epoch of one metrics.jsonl field (trainer/contract/wire.py: Epoch).
OBJECTIVES = ("best_val_accuracy", "val_accuracy", "val_loss", "accuracy", "loss")
DEFAULT_STORAGE_FILE = "sweeps.db"  # beside deploy.yaml: one SQLite file holds every study


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dimension(_Section):
    """One option's values: numbers from ``low`` to ``high`` (both included), or ``choices``."""

    low: float | None = Field(None, description="the smallest value tried (with high)")
    high: float | None = Field(None, description="the largest value tried (with low)")
    log: bool = Field(False, description="sample on a log scale (learning rates, widths); needs low > 0")
    step: float | None = Field(None, gt=0, description="only values low + k * step (null: any value; integer "
                               "options: any integer)")
    choices: list[Any] | None = Field(None, min_length=1, description="the values tried, instead of low/high "
                                      "(each a valid value of the option)")

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        ranged = self.low is not None or self.high is not None or self.log or self.step is not None
        if self.choices is not None and ranged:
            raise ValueError("give {low, high} or {choices}, not both")
        if self.choices is None and (self.low is None or self.high is None):
            raise ValueError("give {low, high} (and log, step) or {choices: [...]}")
        return self


class PrunerSpec(_Section):
    """Optuna's pruner, fed each trial's per-epoch objective: a trial that falls behind is
    stopped (its run kept, state stopped)."""

    kind: Literal["median", "hyperband"] = Field(description="median (MedianPruner) or hyperband "
                                                 "(HyperbandPruner, epochs as its resource)")
    startup_trials: int = Field(5, ge=0, le=10_000, description="median: trials that are never pruned, to learn "
                                "from first")
    warmup_epochs: int = Field(0, ge=0, le=1_000_000, description="median: epochs of each trial never pruned")
    min_epochs: int = Field(1, ge=1, le=1_000_000, description="hyperband: the fewest epochs a trial gets")


def _pruner(value: Any) -> Any:
    return {"kind": value} if isinstance(value, str) else value


class Budget(_Section):
    """The sweep stops launching trials when the next one would pass this (at the mean length
    of the trials so far); a trial under way always runs to its end."""

    instance_hours: float | None = Field(None, gt=0, description="hours of machine time the trials may take in "
                                         "all (each from its launch to its end)")
    usd: float | None = Field(None, gt=0, description="USD the trials' runs may cost in all, at the machine's "
                              "hourly price (ec2.hourly_price, else what `orch status` prices the instance at)")

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.instance_hours is None and self.usd is None:
            raise ValueError("give instance_hours or usd (or leave budget out)")
        return self


class SweepSpec(_Section):
    """`orch sweep run SPEC.yaml`: an Optuna study whose trials are ordinary orch runs."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="the study's name in the storage "
                      "(letters, digits, '.', '_', '-')")
    trials: int = Field(ge=1, le=100_000, description="trials in the study, all states counted (a sweep run again "
                        "continues the study up to this many)")
    parallel: int = Field(1, ge=1, le=64, description="trials at once (machines); target ssh/local: 1, one after "
                          "another")
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        "best_val_accuracy", description="what a trial is judged by: best_val_accuracy (the run's recorded best), "
        "or the best epoch of a metrics field: val_accuracy, val_loss, accuracy, loss")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="null: maximize accuracies, minimize losses")
    storage: str | None = Field(None, min_length=1, description=f"an Optuna storage URL (a team's database: "
                                f"postgresql://...); null: sqlite:///{DEFAULT_STORAGE_FILE} beside deploy.yaml")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="the sampler's seed (TPE); null: random")
    space: dict[str, Dimension] = Field(min_length=1, description="per trainer option (`orch config schema`'s "
                                        "train: keys): {low, high, log, step} or {choices: [...]}")
    pruner: Annotated[PrunerSpec | None, BeforeValidator(_pruner)] = Field(
        None, description="median or hyperband (or {kind, startup_trials, warmup_epochs, min_epochs}); null: no "
        "trial is pruned")
    budget: Budget | None = Field(None, description="{instance_hours, usd}: stop launching before passing it")
    train: dict[str, Any] = Field(default_factory=dict, description="trainer options every trial gets (over "
                                  "deploy.yaml's train:)")

    @model_validator(mode="after")
    def _against_the_contract(self) -> SweepSpec:
        self.train = _options("train", self.train)
        for name, dim in self.space.items():
            option = _option(f"space.{name}", name)
            if name in self.train:
                raise ValueError(f"space.{name}: also given in train:; a swept option takes its values from space")
            if dim.choices is not None:
                dim.choices = list(dict.fromkeys(_checked(f"space.{name}.choices", option, v) for v in dim.choices))
            else:
                _check_range(f"space.{name}", option, dim)
        return self

    @property
    def maximize(self) -> bool:
        if self.direction is not None:
            return self.direction == "maximize"
        return "accuracy" in self.objective

    @property
    def metric(self) -> str:
        """The metrics.jsonl field reported each epoch (the pruner's input)."""
        return "val_accuracy" if self.objective == "best_val_accuracy" else self.objective

    def storage_url(self, cfg: DeployConfig) -> str:
        return self.storage or f"sqlite:///{(cfg.base_dir / DEFAULT_STORAGE_FILE).resolve()}"


def _option(where: str, name: str) -> options.Option:
    option = options.BY_NAME.get(name)
    if option is None or not option.in_yaml:
        close = options.closest(name) if option is None else None
        why = "unknown trainer option" if option is None else "set by orch itself, not by a sweep"
        raise ValueError(f"{where}: {why}" + (f" (did you mean {close}?)" if close else ""))
    return option


def _options(where: str, values: dict[str, Any]) -> dict[str, Any]:
    return {name: _checked(f"{where}.{name}", _option(f"{where}.{name}", name), v) for name, v in values.items()}


def _checked(where: str, option: options.Option, value: Any) -> Any:
    try:
        return option.validate(value)
    except options.OptionError as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix(option.name + ': ')}") from None


def _check_range(where: str, option: options.Option, dim: Dimension) -> None:
    if option.type not in (int, float):
        raise ValueError(f"{where}: {option.name} is {option.bounds()}: give {{choices: [...]}}, not low/high")
    dim.low, dim.high = (_checked(f"{where}.{end}", option, getattr(dim, end)) for end in ("low", "high"))
    if not dim.low < dim.high:
        raise ValueError(f"{where}: low ({dim.low}) must be below high ({dim.high})")
    if dim.log and dim.low <= 0:
        raise ValueError(f"{where}.low: a log scale needs low > 0")
    if dim.log and dim.step is not None:
        raise ValueError(f"{where}: give log or step, not both (Optuna samples one or the other)")
    if option.type is int and dim.step is not None and not float(dim.step).is_integer():
        raise ValueError(f"{where}.step: {option.name} is an integer option: an integer step")
    if dim.step is not None and not math.isclose((dim.high - dim.low) / dim.step,
                                                 round((dim.high - dim.low) / dim.step)):
        raise ValueError(f"{where}.step: high - low must be a multiple of step")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check SPEC.yaml; every problem is one line naming the file and key."""
    from orchestrator.yamlfile import read_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a sweep's SPEC.yaml: README.md, Sweeps)")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name, trials, space, ...)")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_problem(exc, SweepSpec)}") from exc
