"""``python -m trainer <command>``: parse, call one function, render. Errors are mapped to
exit codes here and nowhere else."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from trainer.contract import options
from trainer.contract.exitcodes import help_table
from trainer.ml.errors import ExitCode, TrainerError

SYNTHETIC_NOTE = "The data it writes is SYNTHETIC (generated numbers, not real speech)."
DATA_OPTIONS = ("classes", "cache_dir", "cache")


class _Parser(argparse.ArgumentParser):
    """argparse, strict (no abbreviated options) and with usage errors on one line, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitCode.USAGE), f"trainer: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trainer",
        description="Train and use a speech-emotion classifier on precomputed wav2vec features.",
        epilog="exit codes (shared with orch):\n" + help_table("trainer"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_check_data, _add_synth, _add_train, _add_evaluate, _add_predict):
        add(sub)
    return parser


def _add_check_data(sub: Any) -> None:
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
    options.add_arguments(p, DATA_OPTIONS)
    p.set_defaults(func=cmd_check_data)


def _add_synth(sub: Any) -> None:
    p = sub.add_parser(
        "synth", help="write a SYNTHETIC feature set for demos and tests",
        description="Write a synthetic wav2vec-like feature set with realistic RAVDESS and "
        "CREMA-D file names, several speakers and variable-length (T, D) or (L, T, D) arrays. Like "
        "real frozen features, they carry more speaker than emotion information, the speaker effect "
        "is partly multiplicative, the emotion shows in a fraction of the frames, speakers express it "
        "differently, every utterance and every corpus has its own channel colouring, and feature "
        f"scales span ~50x. {SYNTHETIC_NOTE}",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    p.add_argument("--n", type=_positive, default=1000, help="number of files (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dim", type=int, default=768, help="feature dimension D (default 768)")
    p.add_argument("--min-frames", type=int, default=20, help="shortest sequence (default 20)")
    p.add_argument("--max-frames", type=int, default=60, help="longest sequence (default 60)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--difficulty", type=_positive_float, default=1.0,
                   help="divides every emotion amplitude: 2 halves the emotion, below 1 makes it "
                   "stronger (default 1: as hard as docs/TRAINER.md describes)")
    p.add_argument("--layers", type=int, default=0,
                   help="write (L, T, D) arrays of this many layers, the emotion peaking in the "
                   "upper-middle ones (default 0: (T, D) arrays)")
    p.set_defaults(func=cmd_synth)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train (or continue, or extend) a run",
        description="Train a classifier on DIR into the run directory RUN. Started again on the "
        "same RUN, it continues from the last committed epoch. With --init-from PARENT_RUN it "
        "extends a finished run: same architecture, statistics and split; the extension recipe "
        "for the rest (each option's help says what an extended run uses).",
    )
    p.add_argument("--data-dir", type=Path, required=True, help="folder of feature files")
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory to write")
    options.add_arguments(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="report a run's best checkpoint on labelled files it was not trained on",
                       description="Evaluate RUN's best checkpoint on the usable files of DIR that are not "
                       "in the run's training split: its validation split, and files it never saw (other "
                       "speakers, new data). Confusion matrix, per-class precision/recall/F1, macro F1, "
                       "accuracy and unweighted accuracy.")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--all", action="store_true", dest="all_files",
                   help="score the training split's files too (labelled as such: they flatter the model)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    options.add_arguments(p, ("cache_dir", "cache"))
    p.set_defaults(func=cmd_evaluate, classes=None)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="label feature files with a run's best checkpoint",
                       description="Predict the emotion of feature files (files or folders) with "
                       "RUN's best checkpoint and normalization statistics. A run trained with "
                       "--normalization speaker normalizes the files of each speaker that has at least the "
                       "run's --speaker-min-files files among those given with that speaker's own statistics, "
                       "the others with global statistics; the first line (or each --json object's "
                       "\"normalization\") says which.")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: path, label, probabilities, normalization (speaker: the "
                   "file's speaker had enough files among those given to be normalized on its own; global: "
                   "the run's global statistics)")
    p.set_defaults(func=cmd_predict)

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
    from trainer.contract.labels import parse_classes
    from trainer.ml.data import load_dataset

    update, close = _progress_bar(_console(stderr=True), "loading feature files")
    try:
        return load_dataset(args.data_dir, parse_classes(args.classes), cache_dir=args.cache_dir,
                            use_cache=args.cache is not False, progress=update)
    finally:
        close()


def cmd_check_data(args: argparse.Namespace) -> int:
    from trainer.ml.checkdata import render, report
    from trainer.ml.dataset import require_samples

    ds = load_from_args(args)
    rep = report(ds, args.stats_dir)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        render(rep, _console())
    require_samples(ds)
    return ExitCode.OK


def cmd_synth(args: argparse.Namespace) -> int:
    from trainer.ml.synth import synth

    try:
        summary = synth(args.out_dir, n=args.n, seed=args.seed, dim=args.dim, min_frames=args.min_frames,
                        max_frames=args.max_frames, dtype=args.dtype, difficulty=args.difficulty,
                        layers=args.layers)
    except ValueError as exc:
        raise _usage(str(exc)) from exc
    except OSError as exc:  # a file in the way, no permission...
        raise _usage(f"{args.out_dir}: cannot write the data set there ({exc.strerror})") from exc
    per_corpus = "; ".join(f"{c}: {sum(v.values())} files, {summary.speakers[c]} speakers"
                           for c, v in summary.by_corpus_label.items())
    print(f"wrote {summary.files} SYNTHETIC feature files of per-frame shape {summary.feature_shape} to "
          f"{summary.out_dir} ({per_corpus})")
    return ExitCode.OK


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.contract.wire import Recovery
    from trainer.machine.notify import notifying
    from trainer.ml.config import resolve
    from trainer.ml.mirror import Settings, mirroring
    from trainer.ml.train import _log as train_log
    from trainer.ml.train import train

    given = {o.name: getattr(args, o.name) for o in options.OPTIONS}
    storage = Settings.pop_from(given)  # where the run is mirrored: not a training setting
    recorded = given.pop("record_recovery")  # what happened to the run (checked by argparse): neither
    recovery = Recovery.parse(recorded) if recorded is not None else None
    # The run's end is told after the mirror's final upload (a webhook never delays S3's copy).
    with notifying(Path(args.run_dir), train_log) as notifier, mirroring(Path(args.run_dir), storage, train_log):
        cfg = resolve(given | {"data_dir": str(args.data_dir), "run_dir": str(args.run_dir)})
        return int(train(cfg, recovery=recovery, on_recovered=lambda r: notifier.recovered(r.to_json())))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.ml.data import load_dataset
    from trainer.ml.dataset import require_samples
    from trainer.ml.evaluate import (
        classification_report,
        load_run_model,
        predict_probabilities,
        render_report,
        scoring_scope,
    )

    run = load_run_model(args.run_dir)
    ds = load_dataset(args.data_dir, run.classes, cache_dir=args.cache_dir, use_cache=args.cache is not False)
    require_samples(ds)
    chosen, scope = scoring_scope(args.run_dir, ds, all_files=args.all_files)
    if len(chosen) == 0:
        raise _usage(f"every usable file of {ds.root} is in the run's training split: scoring them would only "
                     "measure memory (--all scores them anyway)")
    normalization = run.prepare_dataset(ds)  # the run's layers; the data folder's speakers, as in training
    probs = predict_probabilities(run.model, [ds.sequence(int(i)) for i in chosen])
    report = classification_report(ds.label_ids()[chosen], probs.argmax(axis=1), run.classes) | {
        "scope": scope, "normalization": normalization.summary()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render_report(report, _console())
    return ExitCode.OK


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from trainer.ml.arrays import as_frames, load_array
    from trainer.ml.discover import feature_files
    from trainer.ml.evaluate import load_run_model, predict_probabilities
    from trainer.ml.layerselect import frames_of
    from trainer.ml.speakers import key_of_path

    run = load_run_model(args.run_dir)
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
            seq = frames_of(as_frames(load_array(f)[1]), run.layers).astype(np.float32)
            if seq.shape[1:] != run.feature_shape or not np.isfinite(seq).all() or len(seq) == 0:
                raise ValueError(f"per-frame shape {seq.shape[1:]} (expected {run.feature_shape}) or NaN/Inf values")
        except Exception as exc:
            problems += 1
            print(f"trainer: skipping {f}: {exc}", file=sys.stderr)
            continue
        usable.append(f)
        sequences.append(seq)
    if not usable:
        raise _usage("no usable feature files among the given paths")
    # The given files' speakers, each with enough files normalized on its own (the run's rule).
    sequences, normalization = run.prepare(sequences, [key_of_path(f) for f in usable])
    probs = predict_probabilities(run.model, sequences)
    if not args.json:
        print(normalization.describe())
    for f, p, how in zip(usable, probs, normalization.modes, strict=True):
        label = run.classes[int(p.argmax())]
        if args.json:
            probabilities = {c: round(float(x), 6) for c, x in zip(run.classes, p, strict=True)}
            print(json.dumps({"path": str(f), "label": label, "probabilities": probabilities, "normalization": how}))
        else:
            print(f"{label:<8} {float(p.max()):.3f}  {how:<7}  {f}")
    return ExitCode.OK if problems == 0 else ExitCode.NO_DATA


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _usage(message: str) -> TrainerError:
    from trainer.ml.errors import UsageError

    return UsageError(message)


def one_line(text: str, limit: int = 400) -> str:
    """Errors are one line: library messages (Keras's span dozens) are cut at the first line."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    # File names are bytes: one that is not UTF-8 is printed escaped, never a crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed on one line (2)
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except TrainerError as exc:
        if args.debug:
            raise
        _say(f"trainer: error: {one_line(str(exc))}")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        _say("trainer: interrupted")
        return int(ExitCode.RUN_STOPPED)
    except Exception as exc:  # the last line of defence: one line, no traceback
        if args.debug:
            raise
        _say(f"trainer: error: unexpected {type(exc).__name__}: {one_line(str(exc))} (run with --debug for "
             "the traceback)")
        return int(ExitCode.ERROR)
    finally:
        _flush_or_drop()


def _say(line: str) -> None:
    # stderr is train.log on the machine: on a full disk even this line may not fit.
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def _flush_or_drop() -> None:
    """Output that cannot be written (train.log on a full disk) is dropped: left buffered,
    Python's own exit would fail to flush it and turn the exit code into 120."""
    for name in ("stdout", "stderr"):
        try:
            getattr(sys, name).flush()
        except OSError:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (stays open until exit)
