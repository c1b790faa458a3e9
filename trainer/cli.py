"""``python -m trainer <command>``: parse, call one function, render. Errors are mapped to
exit codes here and nowhere else."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from trainer.errors import ExitCode, TrainerError

SYNTHETIC_NOTE = "The data it writes is SYNTHETIC (generated numbers, not real speech)."


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", default=None,
                   help="comma-separated class list (default: neutral,calm,happy,sad,angry,fear,disgust)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where loaded arrays are cached "
                   "(default: $ORCH_TRAINER_CACHE or ~/.cache/orch-trainer)")
    p.add_argument("--no-cache", action="store_true", help="decode every file; read and write no cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train and use a speech-emotion classifier on precomputed wav2vec features.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "check-data", help="diagnose a data directory: files, labels, shapes, skips, stats",
        description="Show what a data directory holds: file kinds, recognised name patterns, "
        "labels and speakers per corpus, array keys and shapes, every skipped file with its "
        "reason, and whether normalization statistics are present and valid. Exit code 0 when "
        "at least one file is usable.",
    )
    p.add_argument("data_dir", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--stats-dir", type=Path, default=None,
                   help="check the statistics files in this folder (default: look in DIR)")
    _add_data_options(p)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser(
        "synth", help="write a SYNTHETIC feature set for demos and tests",
        description="Write a synthetic wav2vec-like feature set with realistic RAVDESS and "
        f"CREMA-D file names, several speakers and variable-length (T, D) arrays. {SYNTHETIC_NOTE}",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--n", type=int, default=1000, help="number of files (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dim", type=int, default=768, help="feature dimension D (default 768)")
    p.add_argument("--min-frames", type=int, default=20, help="shortest sequence (default 20)")
    p.add_argument("--max-frames", type=int, default=60, help="longest sequence (default 60)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "train", help="train (or continue, or extend) a run",
        description="Train a classifier on DIR into the run directory RUN. Started again on the "
        "same RUN, it continues from the last finished epoch. With --init-from PARENT_RUN it "
        "extends a finished run: same architecture, statistics and split, half its learning "
        "rate, 100 epochs and 1 warm-up epoch unless given.",
    )
    p.add_argument("--data-dir", type=Path, required=True, help="folder of feature files")
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to write")
    g = p.add_argument_group("training (defaults in parentheses)")
    g.add_argument("--epochs", type=int, help="epochs to train (100)")
    g.add_argument("--batch-size", type=int, help="samples per batch (32)")
    g.add_argument("--learning-rate", type=float, help="peak learning rate (0.001)")
    g.add_argument("--warmup-epochs", type=int, help="linear warm-up before cosine decay (5)")
    g.add_argument("--split", choices=("random", "speaker"), help="validation split (random)")
    g.add_argument("--val-fraction", type=float, help="validation share (0.1)")
    g.add_argument("--seed", type=int, help="random seed (42)")
    g.add_argument("--stats-dir", type=str, help="use the normalization stats in this folder")
    g.add_argument("--init-from", type=str, metavar="RUN_OR_WEIGHTS",
                   help="start from another run's best weights (extended training)")
    g.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 compute on GPU (off)")
    g.add_argument("--patience", type=int, help="stop after N epochs without a better val accuracy (off)")
    g.add_argument("--label-smoothing", type=float, help="(0.0)")
    g.add_argument("--clip-norm", type=float, help="global gradient-norm clipping (1.0)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (1e-4)")
    g.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="weight rare classes up (on)")
    a = p.add_argument_group("architecture")
    a.add_argument("--hidden", type=int, help="frame projection width (256)")
    a.add_argument("--attention", type=int, help="attention pooling width (128)")
    a.add_argument("--dropout", type=float, help="(0.3)")
    _add_data_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="report a run's best checkpoint on a labelled folder",
                       description="Evaluate RUN's best checkpoint on every usable file of DIR: "
                       "confusion matrix, per-class precision/recall/F1, macro F1, accuracy and "
                       "unweighted accuracy.")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-cache", action="store_true", help="decode every file; use no cache")
    p.set_defaults(func=cmd_evaluate, classes=None)

    p = sub.add_parser("predict", help="label feature files with a run's best checkpoint",
                       description="Predict the emotion of feature files (files or folders) with "
                       "RUN's best checkpoint and normalization statistics.")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: path, label, probabilities")
    p.set_defaults(func=cmd_predict)
    return parser


def _console(stderr: bool = False):  # rich is imported only by commands that print tables
    from rich.console import Console

    return Console(stderr=stderr)


def _progress_bar(console, description: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A (update, close) pair drawing a rich progress bar on an interactive console."""
    if not console.is_terminal:
        return (lambda done, total: None), (lambda: None)
    from rich.progress import Progress

    progress = Progress(console=console, transient=True)
    task = progress.add_task(description, total=None)
    progress.start()
    return (lambda done, total: progress.update(task, completed=done, total=total)), progress.stop


def load_from_args(args: argparse.Namespace):
    """Load the dataset named by the common data options, with a progress bar on a TTY."""
    from trainer.data import load_dataset
    from trainer.labels import parse_classes

    update, close = _progress_bar(_console(stderr=True), "loading feature files")
    try:
        return load_dataset(args.data_dir, parse_classes(args.classes), cache_dir=args.cache_dir,
                            use_cache=not args.no_cache, progress=update)
    finally:
        close()


def cmd_check_data(args: argparse.Namespace) -> int:
    from trainer.checkdata import render, report
    from trainer.data import require_samples

    ds = load_from_args(args)
    rep = report(ds, args.stats_dir)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        render(rep, _console())
    require_samples(ds)
    return ExitCode.OK


def cmd_synth(args: argparse.Namespace) -> int:
    from trainer.synth import synth

    try:
        summary = synth(args.out_dir, n=args.n, seed=args.seed, dim=args.dim,
                        min_frames=args.min_frames, max_frames=args.max_frames, dtype=args.dtype)
    except ValueError as exc:
        raise _usage(str(exc)) from exc
    per_corpus = "; ".join(f"{c}: {sum(v.values())} files, {summary.speakers[c]} speakers"
                           for c, v in summary.by_corpus_label.items())
    print(f"wrote {summary.files} SYNTHETIC feature files to {summary.out_dir} ({per_corpus})")
    return ExitCode.OK


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import resolve
    from trainer.labels import parse_classes
    from trainer.train import train

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "debug")}
    options["data_dir"], options["run_dir"] = str(args.data_dir), str(args.run_dir)
    options["cache_dir"] = str(args.cache_dir) if args.cache_dir else None
    options["classes"] = parse_classes(args.classes) if args.classes else None
    options["no_cache"] = args.no_cache or None
    return int(train(resolve(options)))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.data import load_dataset, require_samples
    from trainer.evaluate import classification_report, load_run_model, predict_probabilities, render_report

    model, stats, classes, _shape = load_run_model(args.run_dir)
    ds = load_dataset(args.data_dir, classes, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    require_samples(ds)
    probs = predict_probabilities(model, [ds.sequence(i) for i in range(len(ds))], stats)
    report = classification_report(ds.label_ids(), probs.argmax(axis=1), classes)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render_report(report, _console())
    return ExitCode.OK


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from trainer.data import as_frames, feature_files, load_array
    from trainer.evaluate import load_run_model, predict_probabilities

    model, stats, classes, shape = load_run_model(args.run_dir)
    files: list[Path] = []
    for path in args.paths:
        if path.is_dir():
            files += feature_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise _usage(f"{path}: no such file or folder")
    usable, sequences, problems = [], [], 0
    for f in files:
        try:
            seq = as_frames(load_array(f)[1]).astype(np.float32)
            if seq.shape[1:] != shape or not np.isfinite(seq).all() or len(seq) == 0:
                raise ValueError(f"per-frame shape {seq.shape[1:]} (expected {shape}) or NaN/Inf values")
        except Exception as exc:
            problems += 1
            print(f"trainer: skipping {f}: {exc}", file=sys.stderr)
            continue
        usable.append(f)
        sequences.append(seq)
    if not usable:
        raise _usage("no usable feature files among the given paths")
    probs = predict_probabilities(model, sequences, stats)
    for f, p in zip(usable, probs, strict=True):
        label = classes[int(p.argmax())]
        if args.json:
            probabilities = {c: round(float(x), 6) for c, x in zip(classes, p, strict=True)}
            print(json.dumps({"path": str(f), "label": label, "probabilities": probabilities}))
        else:
            print(f"{label:<8} {float(p.max()):.3f}  {f}")
    return ExitCode.OK if problems == 0 else ExitCode.NO_DATA


def _usage(message: str) -> TrainerError:
    from trainer.errors import UsageError

    return UsageError(message)


def one_line(text: str, limit: int = 400) -> str:
    """Errors are one line: library messages (Keras's span dozens) are cut at the first line."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except TrainerError as exc:
        if args.debug:
            raise
        print(f"trainer: error: {one_line(str(exc))}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr)
        return int(ExitCode.STOPPED)
    except Exception as exc:  # the last line of defence: one line, no traceback
        if args.debug:
            raise
        print(f"trainer: error: unexpected {type(exc).__name__}: {one_line(str(exc))} (run with "
              "--debug for the traceback)", file=sys.stderr)
        return int(ExitCode.ERROR)
