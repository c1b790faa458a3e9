"""The trainer's options, declared ONCE: name, type, default, range or choices, help, and what
an extended run does with each. Pure Python (no numpy, no TensorFlow): both halves import it.

Everything else is derived from :data:`OPTIONS`:

- ``python -m trainer train``'s argparse (:func:`add_arguments`: ranges checked, exit 2),
- :class:`trainer.ml.config.TrainConfig`'s defaults and :func:`trainer.ml.config.resolve`'s
  extension recipe,
- deploy.yaml's typed ``train:`` section and its JSON schema (``orchestrator.config``),
- orch's check of ``orch deploy -- ARGS`` before anything is launched (:func:`parse_argv`),
- the command line orch builds from deploy.yaml (:func:`to_argv`),
- ``orch resume``'s defaults and help (:func:`extension_help`).

What an extended run (``--init-from PARENT_RUN``) does with an option (``on_extend``):

- ``inherit``: the parent's value (the same model, data split and statistics);
  ``shape`` options must not differ at all (they decide the weights' shapes);
- ``recipe``: the extension recipe's value (``extend``), unless given;
- ``given``: like any run, the value given here or the default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INHERIT, RECIPE, GIVEN = "inherit", "recipe", "given"
GROUPS = {
    "training": "training",
    "generalization": "generalization (measures against memorizing speakers)",
    "architecture": "architecture (decides the weights' shapes)",
    "data": "data",
    "storage": "storage mirror (orch sets these from deploy.yaml's `storage:`)",
    "recovery": "recovery (orch sets this when it continues a run after a preemption or a restart)",
}
# Groups that say where a run is mirrored and what happened to it, not how it trains: the
# trainer's CLI takes them out before the options become a TrainConfig.
NOT_TRAINING = ("storage", "recovery")


class OptionError(ValueError):
    """A value outside an option's type, range or choices; the message names the option."""


@dataclass(frozen=True)
class Option:
    name: str  # python and deploy.yaml name; the flag is --name-with-dashes
    type: type  # int | float | str | bool
    default: Any  # None: not set (a path that is not given)
    help: str
    group: str = "training"
    ge: float | None = None  # inclusive lower bound
    gt: float | None = None  # exclusive lower bound
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], Any] | None = None  # extra validation: returns the value or raises ValueError
    on_extend: str = GIVEN
    extend: Any = None  # the recipe's value (absolute), with on_extend == RECIPE
    extend_scale: float | None = None  # ... or a multiple of the parent's value
    shape: bool = False  # decides the weights' shapes: an extended run must not change it
    in_yaml: bool = True  # False: orch sets it itself (init_from)
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bounds(self) -> str:
        """The allowed values in words: 'an integer >= 1 and <= 1000000', 'one of speaker, random'."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "text"}[self.type]
        limits = [f"{sign} {_number(bound)}" for sign, bound in
                  ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)) if bound is not None]
        return " ".join([kind, " and ".join(limits)]).strip()

    def validate(self, value: Any) -> Any:
        """The value converted to the option's type and checked; OptionError says why not."""
        if value is None:
            if self.default is None:
                return None
            raise OptionError(f"{self.name}: must be {self.bounds()}, got nothing")
        try:
            converted = _convert(self.type, value)
        except (TypeError, ValueError):
            raise OptionError(f"{self.name}: must be {self.bounds()}, got {value!r}") from None
        if self.type in (int, float) and not (
            math.isfinite(converted)
            and (self.ge is None or converted >= self.ge) and (self.gt is None or converted > self.gt)
            and (self.le is None or converted <= self.le) and (self.lt is None or converted < self.lt)
        ):
            raise OptionError(f"{self.name}: must be {self.bounds()}, got {value!r}")
        if self.choices and converted not in self.choices:
            raise OptionError(f"{self.name}: must be {self.bounds()}, got {value!r}")
        if self.check is not None:
            try:
                converted = self.check(converted)
            except ValueError as exc:
                raise OptionError(f"{self.name}: {exc}") from None
        return converted

    def describe_default(self) -> str:
        if self.type is bool:
            return "auto" if self.default is None else "on" if self.default else "off"
        if self.default is None:
            return "not set"
        if self.default == 0 and self.name in _ZERO_MEANS_OFF:
            return "0: off"
        return str(self.default)

    def extend_text(self) -> str:
        """What an extended run uses when the option is not given."""
        if self.on_extend == INHERIT:
            return "the parent's"
        if self.on_extend == RECIPE and self.extend_scale is not None:
            return f"{self.extend_scale:g} x the parent's"
        if self.on_extend == RECIPE:
            return str(self.extend)
        return self.describe_default()


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(value)
    if isinstance(value, bool):  # True is an int in Python, never an epoch count
        raise TypeError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value) if isinstance(value, (int, float)) else int(str(value).strip())
    if kind is float:
        return float(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _recovery(text: str) -> str:
    from trainer.contract.wire import Recovery  # its RecoveryError is a ValueError: the message says why

    Recovery.parse(text)
    return text


def _classes(text: str) -> str:
    from trainer.contract.labels import parse_classes  # its ClassListError is a ValueError: the message says why

    return ",".join(parse_classes(text))


LAYERS_HELP = "give all, auto, or distinct 0-based layer numbers such as 6,7,8 or 6-8"


def _layers(text: str) -> str:
    """``all``, ``auto``, or 0-based layer numbers (``6,7,8``, ``6-8``), written canonically."""
    spec = text.strip().lower()
    if spec in ("all", "auto"):
        return spec
    chosen: list[int] = []
    try:
        for part in spec.split(","):
            first, dash, last = part.partition("-")
            chosen += range(int(first), int(last if dash else first) + 1)
    except ValueError:
        raise ValueError(LAYERS_HELP) from None
    if not chosen or min(chosen) < 0 or len(set(chosen)) != len(chosen):
        raise ValueError(LAYERS_HELP)
    return ",".join(str(layer) for layer in sorted(chosen))


# Integer options where 0 turns the measure off.
_ZERO_MEANS_OFF = {"patience", "frame_dropout", "feature_noise", "mixup", "ema_epochs"}

OPTIONS: tuple[Option, ...] = (
    # ---- training
    Option("epochs", int, 100, "epochs to train", ge=1, le=1_000_000,
           on_extend=RECIPE, extend=100),
    Option("batch_size", int, 32, "samples per batch", ge=1, le=65_536, on_extend=INHERIT),
    Option("learning_rate", float, 1e-3, "peak learning rate (AdamW)", gt=0, le=10,
           on_extend=RECIPE, extend_scale=0.5),
    Option("warmup_epochs", int, 5, "linear warm-up epochs before the cosine decay", ge=0, le=1_000_000,
           on_extend=RECIPE, extend=1),
    Option("split", str, "speaker", "how validation files are chosen: whole speakers no training file "
           "shares (speaker), or files stratified by class (random)", choices=("speaker", "random"),
           on_extend=INHERIT),
    Option("val_fraction", float, 0.1, "share of the data used for validation", gt=0, lt=1, on_extend=INHERIT),
    Option("seed", int, 42, "random seed (split, shuffling, initial weights)", ge=0, le=2**32 - 1,
           on_extend=INHERIT),
    Option("clip_norm", float, 1.0, "global gradient-norm clipping", gt=0, le=1e6, on_extend=INHERIT),
    Option("weight_decay", float, 1e-4, "AdamW weight decay", ge=0, le=1, on_extend=INHERIT),
    Option("mixed_precision", bool, None, "half-precision compute: bfloat16 on GPUs of compute capability 8.0 "
           "and up, float16 on 7.x; unset: chosen per device class (on for those GPUs, off on CPUs and older "
           "GPUs; run.json records it)"),
    # ---- generalization
    Option("label_smoothing", float, 0.0, "label smoothing of the cross-entropy", group="generalization",
           ge=0, lt=1, on_extend=INHERIT),
    Option("class_weights", bool, True, "weight rare classes up (RAVDESS calm is ~7x rarer)",
           group="generalization", on_extend=INHERIT),
    Option("frame_dropout", float, 0.5, "augmentation: share of each training sequence's frames left out "
           "(a new random choice every epoch; 0: off)", group="generalization", ge=0, le=0.9,
           on_extend=INHERIT),
    Option("feature_noise", float, 0.3, "augmentation: standard deviation of the noise added to the "
           "normalized training frames (uniform: the first layer's sums of it are Gaussian; 0: off)",
           group="generalization", ge=0, le=10, on_extend=INHERIT),
    Option("mixup", float, 0.0, "augmentation: mixup of pairs of training sequences and their labels, "
           "weights drawn from Beta(x, x) (0: off)", group="generalization", ge=0, le=100,
           on_extend=INHERIT),
    Option("head_dropout", float, 0.3, "dropout of the pooled statistics and the classifier's hidden layer",
           group="generalization", ge=0, lt=1, on_extend=INHERIT),
    Option("ema_epochs", float, 2.0, "weight averaging: validate, checkpoint and keep an exponential moving "
           "average of the weights over about this many epochs (0: off)", group="generalization", ge=0,
           le=1_000_000, on_extend=INHERIT),
    Option("patience", int, 15, "early stopping: stop after this many epochs without a better validation "
           "accuracy (0: off); the best checkpoint is what the run keeps, evaluates and predicts with",
           group="generalization", ge=0, le=1_000_000),
    Option("normalization", str, "speaker", "how frames are standardized before the model: per speaker (each "
           "speaker's files with that speaker's own mean and std, in training and in prediction; the speaker is in "
           "the file name: RAVDESS actor, CREMA-D id; files of speakers with fewer than --speaker-min-files files "
           "get the training split's global statistics), or global (the training split's mean and std for every "
           "file)", group="generalization", choices=("speaker", "global"), on_extend=INHERIT),
    Option("speaker_min_files", int, 10, "per-speaker normalization: the fewest files of one speaker that are "
           "normalized with that speaker's own statistics (training, evaluate and predict alike)",
           group="generalization", ge=1, le=1_000_000, on_extend=INHERIT),
    Option("layers", str, "auto", "(L, T, D) inputs: the layers the model sees, taken once on loading: all, "
           "auto (the 3 consecutive layers around the one a nearest-class-mean probe of pooled features, fitted "
           "on the training split, scores best on the validation split; the run records which), or 0-based "
           "layer numbers such as 6,7,8 or 6-8", group="generalization", check=_layers, on_extend=INHERIT,
           shape=True, metavar="LAYERS"),
    Option("layer_weighting", bool, True, "(L, T, D) inputs: learn a softmax weighting of the layers "
           "(--no-layer-weighting: their plain average)", group="generalization", on_extend=INHERIT),
    # ---- architecture
    Option("hidden", int, 256, "per-frame projection width", group="architecture", ge=1, le=65_536,
           on_extend=INHERIT, shape=True),
    Option("attention", int, 128, "attention width of the pooling layer", group="architecture", ge=1,
           le=65_536, on_extend=INHERIT, shape=True),
    Option("dropout", float, 0.3, "dropout of the per-frame projection", group="architecture", ge=0, lt=1,
           on_extend=INHERIT),
    # ---- data
    Option("classes", str, "neutral,calm,happy,sad,angry,fear,disgust", "comma-separated class list",
           group="data", check=_classes, on_extend=INHERIT, metavar="LIST"),
    Option("stats_dir", str, None, "use the normalization statistics in this folder (an extended run "
           "uses its parent's)", group="data", on_extend=INHERIT, metavar="DIR"),
    Option("cache_dir", str, None, "where loaded arrays are cached (default: $ORCH_TRAINER_CACHE or "
           "~/.cache/orch-trainer)", group="data", metavar="DIR"),
    Option("cache", bool, True, "cache the decoded arrays (--no-cache: decode every file, write nothing)",
           group="data"),
    Option("mirror_uri", str, None, "mirror each committed epoch to s3://bucket/prefix (runs/<run id>/ below it); "
           "credentials come from the machine (its instance role or AWS config), never from orch",
           group="storage", in_yaml=False, metavar="S3_URI"),
    Option("mirror_endpoint_url", str, None, "an S3-compatible endpoint for the mirror (tests use moto's)",
           group="storage", in_yaml=False, metavar="URL"),
    Option("mirror_region", str, None, "the mirror bucket's AWS region", group="storage", in_yaml=False,
           metavar="REGION"),
    Option("record_recovery", str, None, "record this recovery of the run (a JSON object: at, why, kind, "
           "old_instance, new_instance, epoch_restored, lost_seconds) in its committed state before it continues",
           group="recovery", check=_recovery, in_yaml=False, metavar="JSON"),
    Option("init_from", str, None, "start from another run's best weights (extended training), or "
           "from a .weights.h5 file", group="training", in_yaml=False, metavar="RUN_OR_WEIGHTS"),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
ARCHITECTURE = tuple(o.name for o in OPTIONS if o.group == "architecture")


def default(name: str) -> Any:
    """The default of one option (the one place defaults are written is OPTIONS)."""
    return BY_NAME[name].default


def defaults() -> dict[str, Any]:
    return {o.name: o.default for o in OPTIONS}


def validate(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Check a mapping of option values (unknown names, types, ranges); returns them converted."""
    out = {}
    for name, value in values.items():
        option = BY_NAME.get(name)
        if option is None:
            close = closest(name)
            raise OptionError(f"{where}{name}: unknown option" + (f" (did you mean {close}?)" if close else ""))
        try:
            out[name] = option.validate(value)
        except OptionError as exc:
            raise OptionError(f"{where}{exc}") from None
    return out


def closest(name: str) -> str | None:
    """The known option nearest to a misspelt name (None: none is near)."""
    import difflib

    found = difflib.get_close_matches(name, list(BY_NAME), n=1)
    return found[0] if found else None


# --------------------------------------------------------------------------- command line


def _arg_type(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return option.validate(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option.name}: ")) from None

    parse.__name__ = option.type.__name__  # argparse names the type in its messages
    return parse


def add_arguments(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add the options (default: all) to ``parser``, grouped, each defaulting to None ("not given")."""
    wanted = set(names) if names is not None else set(BY_NAME)
    groups: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name not in wanted:
            continue
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(f"{GROUPS[option.group]}, defaults in parentheses")
        help_text = f"{option.help} ({option.describe_default()}; {option.bounds()})"
        if option.on_extend != GIVEN:
            help_text += f"; extended run: {option.extend_text()}"
        help_text = help_text.replace("%", "%%")
        if option.type is bool:
            groups[option.group].add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None,
                                              help=help_text)
        else:
            groups[option.group].add_argument(option.flag, type=_arg_type(option), default=None, help=help_text,
                                              metavar=option.metavar or option.name.upper())


def to_argv(values: Mapping[str, Any]) -> list[str]:
    """Option values as command-line arguments (booleans as --x / --no-x); None is left out."""
    argv: list[str] = []
    for name, value in values.items():
        option = BY_NAME[name]
        if value is None:
            continue
        if option.type is bool:
            argv.append(option.flag if value else "--no-" + option.flag[2:])
        else:  # one token: a value starting with '-' stays a value
            argv.append(f"{option.flag}={value}")
    return argv


class ArgvError(ValueError):
    """An argument list the trainer would refuse."""


class _CheckingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgvError(message)


def parse_argv(argv: Sequence[str], *, reserved: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options given in ``argv`` (as the trainer would parse them), or ArgvError.

    ``reserved``: options the caller sets itself, with what to say when they are given."""
    parser = _CheckingParser(prog="trainer train", allow_abbrev=False, add_help=False)
    add_arguments(parser)
    namespace = parser.parse_args(list(argv))
    given = {k: v for k, v in vars(namespace).items() if v is not None}
    for name, why in (reserved or {}).items():
        if name in given:
            raise ArgvError(f"{BY_NAME[name].flag}: {why}")
    return given


def extension_help(name: str) -> str:
    """``orch resume``'s help for a recipe option: what an extended run uses by default."""
    option = BY_NAME[name]
    return f"{option.help} (default for an extended run: {option.extend_text()})"
