"""Training benchmarks on SYNTHETIC data, each against a baseline measured in the same run.

Two data sets, each with a share of the speakers of each corpus moved to a HELD-OUT folder that
neither training nor validation sees:

- ``synth``: ``trainer synth`` at its default difficulty, the set the defaults were chosen on;
- ``independent``: bench/independent_data.py, a second generator written apart from trainer
  synth (another structure, other seeds and corpus sizes) on which no default was chosen: the
  check that the defaults are not tuned to the data they are measured on.

Our model is measured on the product path: ``python -m trainer train`` (speaker split of the
rest), then ``python -m trainer predict --run-dir RUN HELDOUT --json``, scored from the files'
labels.

1. held-out speakers, on both sets: our model (default options) vs a logistic regression and a
   small MLP (scikit-learn) on mean+std pooled features, z-scored with the training split's
   statistics (the linear model of issue 19), and the same two on per-speaker normalized
   features (our model's inputs with ``--normalization speaker``); each baseline's
   regularization chosen on the validation split; accuracy, unweighted accuracy (UA, mean
   per-class recall) and macro-F1, mean ± sd over seeds, and ours - logistic regression paired
   by seed;
2. ablation on the synth set: what each generalization measure adds on held-out speakers (each
   measure taken out of the defaults, or added when it is off by default; paired by seed);
3. layer selection on (L, T, D) features: the 3 layers a probe chooses (``--layers auto``, the
   default) vs all layers with a learned weighting, or their plain average;
4. extension recipes: how often and by how much a run extended from a finished run
   (``--init-from``) beats its parent on held-out speakers, the seed recipe vs alternatives;
5. time per epoch of ``trainer train`` (every default) vs a bare ``model.fit`` of the same
   architecture on one padded in-memory tensor; the host pipeline's samples/s vs the model
   step's; peak RSS vs the same run on a tiny dataset.

    python bench/bench_train.py [--n 2000] [--dim 256] [--seeds 3] [--epochs 30] [--json results.json]
    python bench/bench_train.py --quick      # tiny sizes, seconds of training, nothing asserted
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import independent_data  # noqa: E402
from trainer.contract import layout, options  # noqa: E402
from trainer.contract.labels import label_from_path  # noqa: E402
from trainer.contract.layout import SYNTHETIC_MARKER as MARKER  # noqa: E402
from trainer.ml.config import Architecture  # noqa: E402
from trainer.ml.data import load_dataset  # noqa: E402
from trainer.ml.dataset import Dataset  # noqa: E402
from trainer.ml.evaluate import classification_report  # noqa: E402
from trainer.ml.speakers import Normalization  # noqa: E402
from trainer.ml.split import Split, load_split  # noqa: E402
from trainer.ml.stats import Stats, compute_stats, load_stats  # noqa: E402
from trainer.ml.synth import synth  # noqa: E402

METRICS = ("accuracy", "unweighted_accuracy", "macro_f1")
METRIC_NAMES = {"accuracy": "accuracy", "unweighted_accuracy": "UA", "macro_f1": "macro-F1"}


@dataclass(frozen=True)
class Measure:
    """One generalization measure of the ablation: its option, its value when it is left out
    (the trainer before issue 11), and the value tried when the default leaves it out."""

    option: str
    off: Any
    tried: Any

    @property
    def default(self) -> Any:
        return options.default(self.option)

    def row(self) -> tuple[str, dict[str, Any]]:
        """(label, options) of the ablation row: the defaults without it, or with it added."""
        if self.default != self.off:
            left_out = f"{self.option} {self.off}" if isinstance(self.off, str) else f"without {self.option} ({self.off})"
            return left_out, {self.option: self.off}
        return f"with {self.option} {self.tried}", {self.option: self.tried}


MEASURES = (
    Measure("normalization", "global", "speaker"),
    Measure("frame_dropout", 0.0, 0.2),
    Measure("feature_noise", 0.0, 0.5),
    Measure("mixup", 0.0, 0.4),
    Measure("head_dropout", 0.3, 0.6),
    Measure("weight_decay", 1e-4, 0.05),
    Measure("ema_epochs", 0.0, 2.0),
    Measure("patience", 0, 10),
)
BEFORE = {m.option: m.off for m in MEASURES}  # every measure out: the trainer before issue 11
# Extension recipes: (name, options of the extended run besides --init-from).
RECIPES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("seed recipe (lr x0.5, warm-up 1)", {}),
    ("lr x0.1, warm-up 1", {"learning_rate": 0.1}),
    ("lr x1 (warm restart), warm-up 2", {"learning_rate": 1.0, "warmup_epochs": 2}),
)


@dataclass(frozen=True)
class Sizes:
    n: int
    dim: int
    min_frames: int
    max_frames: int
    layers_dim: int  # (L, T, D) set of section 3
    layers: int
    epochs: int | None  # None: the trainer's default (with early stopping)
    extension_epochs: int | None  # None: the recipe's own (the options table's extend value)
    seeds: tuple[int, ...]
    timing_epochs: int


def sizes(args: argparse.Namespace) -> Sizes:
    if args.quick:
        return Sizes(n=480, dim=16, min_frames=6, max_frames=12, layers_dim=8, layers=3, epochs=2,
                     extension_epochs=1, seeds=(1,), timing_epochs=2)
    return Sizes(n=args.n, dim=args.dim, min_frames=20, max_frames=60, layers_dim=args.layers_dim,
                 layers=args.layers, epochs=args.epochs, extension_epochs=args.extension_epochs,
                 seeds=tuple(range(1, args.seeds + 1)), timing_epochs=6)


# --------------------------------------------------------------------------- data


def speaker_of(path: Path) -> str:
    info = label_from_path(path.name)
    return f"{info.corpus}:{info.speaker}"


def hold_out_speakers(source: Path, train_dir: Path, heldout_dir: Path, share: float, seed: int = 0) -> int:
    """Move the files of ``share`` of each corpus's speakers to ``heldout_dir``, the rest to
    ``train_dir`` (both keep the SYNTHETIC marker); returns the number of held-out speakers."""
    files = sorted(p for p in source.iterdir() if p.suffix in (".npz", ".npy"))
    speakers = sorted({speaker_of(p) for p in files})
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for corpus in sorted({s.split(":")[0] for s in speakers}):
        members = [s for s in speakers if s.startswith(corpus + ":")]
        held |= set(rng.choice(members, max(1, round(share * len(members))), replace=False).tolist())
    for folder in (train_dir, heldout_dir):
        folder.mkdir(parents=True)
        shutil.copy(source / MARKER, folder / MARKER)
    for p in files:
        p.rename((heldout_dir if speaker_of(p) in held else train_dir) / p.name)
    return len(held)


@dataclass(frozen=True)
class DataSet:
    name: str
    train: Path
    heldout: Path
    description: str


# The data sets of section 1: what each is, in the tables' words.
SETS = {
    "synth": "trainer synth, default difficulty: the set the defaults were chosen on",
    "independent": "bench/independent_data.py: an independent generator no default was chosen on",
}
INDEPENDENT_SEED = 1919  # not the synth set's 0: nothing of the two draws is shared


def make_data(work: Path, name: str, s: Sizes, share: float, *, dim: int, layers: int = 0,
              generator: str = "synth") -> DataSet:
    source = work / f"{name}-all"
    if generator == "independent":
        speakers = independent_data.generate(source, n=s.n, seed=INDEPENDENT_SEED, dim=dim, min_frames=s.min_frames,
                                             max_frames=s.max_frames)
        shape: tuple[int, ...] = (dim,)
    else:
        summary = synth(source, n=s.n, seed=0, dim=dim, min_frames=s.min_frames, max_frames=s.max_frames,
                        dtype="float16", layers=layers)
        speakers, shape = summary.speakers, summary.feature_shape
    held = hold_out_speakers(source, work / f"{name}-train", work / f"{name}-heldout", share)
    shutil.rmtree(source)
    total = sum(speakers.values())
    heldout_files = sum(1 for p in (work / f"{name}-heldout").iterdir() if p.suffix in (".npz", ".npy"))
    description = (f"{SETS[generator]}; {s.n} files, per-frame shape {shape}, {total} speakers; "
                   f"{held} speakers ({heldout_files} files) held out")
    return DataSet(name, work / f"{name}-train", work / f"{name}-heldout", description)


# --------------------------------------------------------------------------- our model


def run_trainer(args: Sequence[str], log: Path) -> tuple[int, float]:
    """Run `python -m trainer ...`; returns (exit code, peak RSS in MB of that process)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def score(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict[str, float]:
    index = {c: i for i, c in enumerate(classes)}
    report = classification_report(np.array([index[t] for t in truth]), np.array([index[p] for p in predicted]),
                                   classes)
    return {m: report[m] for m in METRICS}


def predict_heldout(run: Path, heldout: Path) -> dict[str, float]:
    """The product path: `trainer predict --json` on the held-out folder, scored by the files'
    labels (their names, or their label folders in a :func:`speakerless_copy`)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "trainer", "predict", "--run-dir", str(run), str(heldout), "--json"],
                         capture_output=True, text=True, env=env)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not rows:
        sys.exit(f"predict on {heldout} gave nothing: {out.stderr[-2000:]}")
    classes = list(rows[0]["probabilities"])
    pairs = [(label_from_path(Path(r["path"]).relative_to(heldout)).label, r["label"]) for r in rows]
    pairs = [(t, p) for t, p in pairs if t in classes]  # RAVDESS surprise is not a class
    return score([t for t, _ in pairs], [p for _, p in pairs], classes)


def speakerless_copy(heldout: Path, target: Path) -> Path:
    """``heldout``'s files (hard links) in label folders under names that name no speaker: what
    prediction sees of new speakers' files that come one at a time (global statistics)."""
    for i, p in enumerate(sorted(q for q in heldout.iterdir() if q.suffix in (".npz", ".npy"))):
        folder = target / str(label_from_path(p.name).label)
        folder.mkdir(parents=True, exist_ok=True)
        os.link(p, folder / f"file{i}{p.suffix}")
    return target


@dataclass
class Run:
    """One finished trainer run and its held-out scores."""

    path: Path
    heldout: dict[str, float]
    status: dict[str, Any]
    peak_rss_mb: float
    seconds: float


@dataclass
class Trainer:
    """Trains runs into ``work/runs`` with the bench's common options."""

    work: Path
    common: list[str]  # every run's options but --epochs (extra options come after: they win)
    progress: Callable[[str], None]
    runs: list[Run] = field(default_factory=list)

    def train(self, name: str, data: DataSet, values: dict[str, Any], extra: Sequence[str], *,
              epochs: int | None) -> Run:
        """One run of ``epochs`` (None: the trainer's own choice, e.g. an extension recipe's)."""
        run = self.work / "runs" / name
        start = time.perf_counter()
        argv = ["train", "--data-dir", str(data.train), "--run-dir", str(run), *self.common,
                *([] if epochs is None else ["--epochs", str(epochs)]), *extra, *options.to_argv(values)]
        code, peak = run_trainer(argv, self.work / "runs" / f"{name}.log")
        if code != 0:
            sys.exit(f"trainer failed ({code}); see {self.work / 'runs' / f'{name}.log'}")
        result = Run(run, predict_heldout(run, data.heldout), json.loads((run / layout.STATUS).read_text()), peak,
                     time.perf_counter() - start)
        self.progress(f"{name}: held-out accuracy {result.heldout['accuracy']:.3f}, best val "
                      f"{result.status['best_val_accuracy']:.3f} at epoch {result.status['best_epoch']} of "
                      f"{result.status['epoch']} ({result.seconds:.0f} s)")
        self.runs.append(result)
        return result


# --------------------------------------------------------------------------- baselines


def pooled(ds: Dataset, stats: Stats) -> np.ndarray:
    """Mean and standard deviation over frames of the z-scored features, one row per file."""
    rows = []
    for i in range(len(ds)):
        z = stats.normalize(ds.sequence(i)).reshape(len(ds.sequence(i)), -1)
        rows.append(np.concatenate([z.mean(axis=0), z.std(axis=0)]))
    return np.stack(rows)


def balanced_weights(y: np.ndarray) -> np.ndarray:
    counts = np.bincount(y)
    return (len(y) / (np.count_nonzero(counts) * counts[y])).astype(np.float64)


def baselines(data: DataSet, run: Path, cache: Path, quick: bool) -> dict[str, dict[str, float]]:
    """Logistic regression and MLP on pooled features of the run's split, z-scored with the
    training split's statistics of the raw features, then the same on per-speaker normalized
    features (the rule of ``--normalization speaker``, the option's default minimum of files);
    each one's regularization is the one of a small grid that scores best on the validation split."""
    ds = load_dataset(data.train, cache_dir=cache)
    held = load_dataset(data.heldout, cache_dir=cache)
    split, _ = load_split(run / layout.stats_path(layout.SPLIT_JSON), ds)
    raw = compute_stats(ds, split.train)
    out = _pooled_models(ds, held, split, raw, quick, "")
    per_speaker = Normalization(options.default("speaker_min_files"), raw)
    per_speaker.apply_dataset(ds)
    per_speaker.apply_dataset(held)
    return out | _pooled_models(ds, held, split, compute_stats(ds, split.train), quick, PER_SPEAKER)


PER_SPEAKER = ", per-speaker normalized"
LINEAR = "logistic regression"
MLP = "MLP (256 hidden)"


def _pooled_models(ds: Dataset, held: Dataset, split: Split, stats: Stats, quick: bool,
                   suffix: str) -> dict[str, dict[str, float]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    features = pooled(ds, stats)
    scaler = StandardScaler().fit(features[split.train])
    x, x_held = scaler.transform(features), scaler.transform(pooled(held, stats))
    y, y_held = ds.label_ids(), held.label_ids()
    models: dict[str, Callable[[float], Any]] = {
        LINEAR: lambda c: LogisticRegression(C=c, max_iter=3000),
        MLP: lambda a: MLPClassifier((256,), alpha=a, max_iter=60 if quick else 300, random_state=0),
    }
    grids = {LINEAR: (1e-3, 1e-2, 1e-1, 1.0), MLP: (1e-2, 1.0, 10.0, 30.0)}
    out = {}
    for name, make in models.items():
        fitted = [_fit(make(v), x, y, split) for v in grids[name]]
        best = max(fitted, key=lambda m: m.score(x[split.val], y[split.val]))
        out[name + suffix] = score([ds.classes[k] for k in y_held], [ds.classes[k] for k in best.predict(x_held)],
                                   ds.classes)
    return out


def _fit(model: Any, x: np.ndarray, y: np.ndarray, split: Split) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of the tiny quick mode
        return model.fit(x[split.train], y[split.train], sample_weight=balanced_weights(y[split.train]))


# --------------------------------------------------------------------------- timing


def in_memory_fit_seconds(data: DataSet, run: Path, cache: Path, arch: Architecture, batch: int,
                          epochs: int) -> float:
    """Median epoch time of a bare model.fit of the same architecture (no augmentation, no
    EMA, no class weights) on one in-memory tensor padded to the longest sequence (the baseline)."""
    import keras

    from bench.speed import EpochClock
    from trainer.ml.model import build_model
    from trainer.ml.pipeline import pad_batch

    ds = load_dataset(data.train, cache_dir=cache)
    split, _ = load_split(run / layout.stats_path(layout.SPLIT_JSON), ds)
    stats = load_stats(run / layout.STATS_DIR, ds.feature_shape)

    def tensors(idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        x = pad_batch([ds.sequence(int(i)) for i in idx])
        return x, np.eye(len(ds.classes), dtype=np.float32)[ds.label_ids()[idx]]

    x_train, y_train = tensors(split.train)
    x_val, y_val = tensors(split.val)
    keras.utils.set_random_seed(0)
    model = build_model(arch, stats, len(ds.classes))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, global_clipnorm=1.0),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    clock = EpochClock()
    model.fit(x_train, y_train, validation_data=(x_val, y_val), batch_size=batch, epochs=epochs,
              shuffle=True, verbose=0, callbacks=[clock])
    return clock.median()


def pipeline_and_step_rates(data: DataSet, run: Path, cache: Path, batch: int) -> tuple[float, float]:
    """(samples/s of the host pipeline, one thread; samples/s of the model step with every
    default: augmentation in the graph, EMA, class weights) on the run's training split."""
    from bench.speed import pipeline_rate, step_rate, trainer_model, training_sequence
    from trainer.ml.config import TrainConfig

    ds = load_dataset(data.train, cache_dir=cache)
    split, _ = load_split(run / layout.stats_path(layout.SPLIT_JSON), ds)
    stats = load_stats(run / layout.STATS_DIR, ds.feature_shape)
    cfg = TrainConfig(data_dir=str(data.train), run_dir=str(run), batch_size=batch, classes=ds.classes)
    seq = training_sequence(ds, split.train, cfg, workers=1)
    pipeline = pipeline_rate(seq)
    return pipeline, step_rate(trainer_model(cfg, stats, len(ds.classes), len(seq)), seq)


def median_epoch_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / layout.METRICS).read_text().splitlines()]
    return float(np.median([r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]))


# --------------------------------------------------------------------------- report


def mean_sd(values: Sequence[float]) -> str:
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def signed_mean_sd(values: Sequence[float]) -> str:
    values = list(values)
    sd = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):+.3f}{sd}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(f"  {line}\n  {'-' * len(line)}")
    for row in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def metric_cells(scores: Sequence[dict[str, float]]) -> list[str]:
    return [mean_sd([s[m] for s in scores]) for m in METRICS]


# --------------------------------------------------------------------------- sections


OURS = "ours: trainer train + predict (defaults)"
ALONE = "ours, each file predicted alone (global statistics: no speaker to normalize)"


def section_heldout(name: str, data: DataSet, runs: list[Run], base: dict[int, dict[str, dict[str, float]]],
                    seeds: Sequence[int]) -> dict[str, list[dict[str, float]]]:
    """Section 1 on one data set: ours (defaults) vs the baselines, each measured once per seed."""
    results = {OURS: [r.heldout for r in runs]}
    for model in next(iter(base.values())):
        results[model] = [base[s][model] for s in seeds]
    rows = [[model, *metric_cells(scores)] for model, scores in results.items()]
    print_table(f"1. held-out speakers, {name} set ({data.description}): mean ± sd over seeds "
                + ", ".join(map(str, seeds)), ["model", *(METRIC_NAMES[m] for m in METRICS)], rows)
    ours = np.array([s["accuracy"] for s in results[OURS]])
    for model in (LINEAR, LINEAR + PER_SPEAKER):
        other = np.array([s["accuracy"] for s in results[model]])
        target = " (target >= +0.10)" if model == LINEAR else ""
        print(f"  ours - {model}: {signed_mean_sd(ours - other)} accuracy{target}")
    return results


def ablation_rows() -> list[tuple[str, dict[str, Any]]]:
    return [("defaults", {}), *(m.row() for m in MEASURES), ("before issue 11 (all of them out)", dict(BEFORE))]


def section_ablation(ablation: dict[str, list[Run]]) -> None:
    """Section 2: each row's held-out scores and its paired difference to the defaults."""
    reference = [r.heldout["accuracy"] for r in ablation["defaults"]]
    rows = []
    for name, runs in ablation.items():
        delta = "" if name == "defaults" else signed_mean_sd(
            [r.heldout["accuracy"] - ref for r, ref in zip(runs, reference, strict=True)])
        epochs = mean_sd([r.status["epoch"] for r in runs]).replace(".000", "")
        rows.append([name, *metric_cells([r.heldout for r in runs]), delta, epochs])
    print_table("2. ablation on held-out speakers (SYNTHETIC data): defaults = "
                + ", ".join(f"{m.option} {m.default}" for m in MEASURES),
                ["options", *(METRIC_NAMES[m] for m in METRICS), "Δ accuracy vs defaults", "epochs run"], rows)


def section_layers(runs: dict[str, list[Run]], description: str, chosen: Sequence[str]) -> None:
    rows = [[name, *metric_cells([r.heldout for r in rs])] for name, rs in runs.items()]
    default, *others = runs.values()
    print_table(f"3. layer selection and weighting, (L, T, D) SYNTHETIC data ({description}); layers --layers auto "
                f"chose per seed: {'; '.join(chosen)}", ["layers", *(METRIC_NAMES[m] for m in METRICS)], rows)
    for name, other in zip(list(runs)[1:], others, strict=True):
        delta = [a.heldout["accuracy"] - b.heldout["accuracy"] for a, b in zip(default, other, strict=True)]
        print(f"  --layers auto - ({name}): {signed_mean_sd(delta)} accuracy")


def section_extension(parents: list[Run], children: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Section 4: per recipe, how often the child beats its parent on held-out speakers."""
    rows, out = [], {}
    for name, runs in children.items():
        delta = [c.heldout["accuracy"] - p.heldout["accuracy"] for c, p in zip(runs, parents, strict=True)]
        val_beat = sum((c.status.get("best_epoch") or 0) > 0 for c in runs)
        held_beat = sum(d > 0 for d in delta)
        out[name] = {"delta": delta, "val_beat": val_beat, "heldout_beat": held_beat}
        rows.append([name, f"{val_beat}/{len(runs)}", f"{held_beat}/{len(runs)}", signed_mean_sd(delta),
                     mean_sd([c.heldout["accuracy"] for c in runs])])
    print_table("4. extended runs (--init-from the defaults run of each seed; SYNTHETIC data)",
                ["recipe", "beat parent on validation", "beat parent held-out", "Δ held-out accuracy",
                 "held-out accuracy"], rows)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 1-2 epochs: checks that the bench runs")
    ap.add_argument("--n", type=int, default=3000, help="synthetic files (before holding speakers out)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6, help="L of the (L, T, D) set of section 3")
    ap.add_argument("--layers-dim", type=int, default=256, help="D of the (L, T, D) set of section 3")
    ap.add_argument("--heldout-share", type=float, default=0.5, help="share of each corpus's speakers held out")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds (split, initial weights, order)")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"epochs of every run (default: the trainer's, {options.default('epochs')}, "
                    "with its early stopping)")
    ap.add_argument("--extension-epochs", type=int, default=None,
                    help="cap the extended runs' epochs (default: the recipe's, early stopping ends them)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sections", default="heldout,ablation,layers,extension,timing",
                    help="comma-separated subset (the defaults rows of the ablation run with any but layers)")
    ap.add_argument("--json", type=Path, default=None, help="also write every measurement here (after each section)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs, data)")
    return ap.parse_args()


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    args = parse_args()
    s = sizes(args)
    sections = set(args.sections.split(","))
    work = Path(tempfile.mkdtemp(prefix="orch-bench-train-"))
    (work / "runs").mkdir()
    cache = work / "cache"
    data = make_data(work, "main", s, args.heldout_share, dim=s.dim)
    sets = {"synth": data}
    if "heldout" in sections:
        sets["independent"] = make_data(work, "independent", s, args.heldout_share, dim=s.dim,
                                        generator="independent")
    epochs = f"--epochs {s.epochs}" if s.epochs else f"{options.default('epochs')} epochs (the default)"
    print("SYNTHETIC data: " + "; ".join(f"{name} set: {d.description}" for name, d in sets.items()))
    print(f"trainer: --split speaker --val-fraction 0.2, {epochs}, seeds {list(s.seeds)}")
    trainer = Trainer(work, ["--split", "speaker", "--val-fraction", "0.2", "--batch-size", str(args.batch_size),
                             "--cache-dir", str(cache)], progress)
    results: dict[str, Any] = {"data": {name: d.description for name, d in sets.items()}, "seeds": list(s.seeds),
                               "epochs": s.epochs}

    def save(key: str, value: Any) -> None:
        results[key] = value
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))

    rows = ablation_rows() if "ablation" in sections else ablation_rows()[:1]
    if not sections & {"heldout", "ablation", "extension", "timing"}:
        rows = []  # the layers section alone needs no run on the main set
    if args.quick and rows:  # every section and table once, with as few (slow to start) trainer processes as may be
        rows = [rows[0], rows[-1]]
    ablation = {name: [trainer.train(f"{_slug(name)}-s{seed}", data, values, ["--seed", str(seed)], epochs=s.epochs)
                       for seed in s.seeds] for name, values in rows}
    save("ablation", {name: [r.heldout | {"epochs": r.status["epoch"]} for r in runs]
                      for name, runs in ablation.items()})
    if "heldout" in sections:
        heldout = {}
        for name, d in sets.items():
            runs = ablation["defaults"] if d is data else [
                trainer.train(f"{name}-defaults-s{seed}", d, {}, ["--seed", str(seed)], epochs=s.epochs)
                for seed in s.seeds]
            base = {seed: baselines(d, run.path, cache, args.quick) for seed, run in zip(s.seeds, runs, strict=True)}
            if options.default("normalization") == "speaker":  # what files that come one at a time get
                alone = speakerless_copy(d.heldout, work / f"{name}-alone")
                for seed, run in zip(s.seeds, runs, strict=True):
                    base[seed] = {ALONE: predict_heldout(run.path, alone)} | base[seed]
            heldout[name] = section_heldout(name, d, runs, base, s.seeds)
        save("heldout", heldout)
    if "ablation" in sections:
        section_ablation(ablation)
    if "layers" in sections:
        save("layers", run_layers(work, s, args, trainer))
    if "extension" in sections:
        save("extension", run_extension(s, trainer, data, ablation["defaults"], RECIPES[:1] if args.quick else RECIPES))
    if "timing" in sections:
        save("timing", run_timing(work, s, args, trainer, data, ablation))
    if args.keep:
        print(f"\nwork folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def run_extension(s: Sizes, trainer: Trainer, data: DataSet, parents: list[Run],
                  recipes: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Section 4: every recipe extends every seed's defaults run."""
    children = {name: [trainer.train(f"ext-{_slug(name)}-s{seed}", data, _recipe(values),
                                     ["--init-from", str(parent.path)], epochs=s.extension_epochs)
                       for seed, parent in zip(s.seeds, parents, strict=True)]
                for name, values in recipes}
    return section_extension(parents, children)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:40]


def _recipe(values: dict[str, Any]) -> dict[str, Any]:
    """A recipe's options; its learning_rate is a multiple of the parent's (the default rate)."""
    out = dict(values)
    if "learning_rate" in out:
        out["learning_rate"] = out["learning_rate"] * options.default("learning_rate")
    return out


LAYER_ROWS = (("--layers auto (default): the probe's 3 layers, learned weighting", {}),
              ("--layers all, learned softmax weighting", {"layers": "all"}),
              ("--layers all, plain average", {"layers": "all", "layer_weighting": False}))


def run_layers(work: Path, s: Sizes, args: argparse.Namespace, trainer: Trainer) -> dict[str, Any]:
    """Section 3: the layers a probe chooses (the default), all layers weighted, all averaged."""
    data = make_data(work, "layers", s, args.heldout_share, dim=s.layers_dim, layers=s.layers)
    runs = {name: [trainer.train(f"layers-{_slug(name)}-s{seed}", data, values, ["--seed", str(seed)],
                                 epochs=s.epochs) for seed in s.seeds] for name, values in LAYER_ROWS}
    chosen = [json.loads((r.path / layout.RUN_JSON).read_text())["config"]["layers"] for r in runs[LAYER_ROWS[0][0]]]
    section_layers(runs, data.description, chosen)
    return {name: [r.heldout for r in rs] for name, rs in runs.items()} | {"chosen": chosen}


TIMING_PAIRS = 3  # bare fits and trainer runs measured in turns


def timing_run(work: Path, trainer: Trainer, data: DataSet, k: int, epochs: int) -> Path:
    """A `trainer train` run with every default, for its epoch times only."""
    run = work / "runs" / f"timing-{k}"
    code, _ = run_trainer(["train", "--data-dir", str(data.train), "--run-dir", str(run), *trainer.common,
                           "--epochs", str(epochs), "--seed", "1"], work / "runs" / f"timing-{k}.log")
    if code != 0:
        sys.exit(f"timing run failed ({code}); see {work / 'runs' / f'timing-{k}.log'}")
    return run


def run_timing(work: Path, s: Sizes, args: argparse.Namespace, trainer: Trainer, data: DataSet,
               ablation: dict[str, list[Run]]) -> dict[str, float]:
    """Section 5: epoch time vs a bare in-memory model.fit, the host pipeline vs the model step,
    and peak RSS vs a tiny run (not in --quick: its data set is tiny already)."""
    reference = ablation["defaults"][0]
    plain = next((rs[0] for name, rs in ablation.items() if name.startswith("before")), None)
    tiny_peak = None
    if not args.quick:
        tiny_source = work / "tiny"
        synth(tiny_source, n=60, seed=0, dim=s.dim, min_frames=s.min_frames, max_frames=s.max_frames)
        tiny_code, tiny_peak = run_trainer(["train", "--data-dir", str(tiny_source), "--run-dir",
                                            str(work / "tiny-run"), *trainer.common, "--epochs", "2"], work / "tiny.log")
        if tiny_code != 0:
            sys.exit(f"tiny run failed; see {work / 'tiny.log'}")
    ds = load_dataset(data.train, cache_dir=work / "cache")
    # The machine is shared: the bare fit and a trainer run are measured in turns (each pair
    # close in time), and the ratio is the median of the pairs' ratios. --quick: one pair, with
    # the defaults run sections 1-4 made.
    pairs = []
    for k in range(1 if args.quick else TIMING_PAIRS):
        baseline = in_memory_fit_seconds(data, reference.path, work / "cache", Architecture(), args.batch_size,
                                         s.timing_epochs)
        run = reference.path if args.quick else timing_run(work, trainer, data, k, s.timing_epochs)
        pairs.append((baseline, median_epoch_seconds(run)))
    baseline, ours = (float(np.median(column)) for column in zip(*pairs, strict=True))
    ratio = float(np.median([b / a for a, b in pairs]))
    pipeline, step = pipeline_and_step_rates(data, reference.path, work / "cache", args.batch_size)
    data_mb = ds.frames.nbytes / 1e6
    out = {"in_memory_fit_s": baseline, "trainer_defaults_s": ours, "ratio": ratio, "pairs": pairs,
           "pipeline_samples_per_s": pipeline,
           "step_samples_per_s": step, "peak_rss_mb": reference.peak_rss_mb, "tiny_peak_rss_mb": tiny_peak,
           "dataset_mb": data_mb}
    print("\n5. time per epoch (median of epochs 2..) and memory, SYNTHETIC training folder "
          f"({len(ds)} files, {data_mb:.0f} MB as float16)")
    print(f"   baseline: bare model.fit, one padded in-memory tensor      {baseline:6.2f} s")
    print(f"   trainer train, every default (augmentation in the graph)  {ours:6.2f} s   ratio "
          f"{ratio:.2f} (target <= 0.9; median of {len(pairs)} pairs measured in turns)")
    if plain is not None:
        out["trainer_no_augmentation_s"] = ours_plain = median_epoch_seconds(plain.path)
        print(f"   trainer train, no augmentation (before issue 11)          {ours_plain:6.2f} s   ratio "
              f"{ours_plain / baseline:.2f} (target <= 1.1)")
    print(f"   host pipeline, one thread (gather and pad)                {pipeline:8.0f} samples/s")
    print(f"   model step, every default (batches made beforehand)       {step:8.0f} samples/s   pipeline / step "
          f"{pipeline / step:.1f} (target >= 5)")
    print(f"   peak RSS, training run                                    {reference.peak_rss_mb:7.0f} MB")
    if tiny_peak is not None:
        print(f"   baseline: peak RSS, same run on 60 files                  {tiny_peak:7.0f} MB")
        print(f"   (peak - baseline) / dataset arrays                        "
              f"{(reference.peak_rss_mb - tiny_peak) / data_mb:7.2f}")
    return out


if __name__ == "__main__":
    main()
