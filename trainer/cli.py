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


def _usage(message: str) -> TrainerError:
    from trainer.errors import UsageError

    return UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except TrainerError as exc:
        if args.debug:
            raise
        print(f"trainer: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr)
        return int(ExitCode.STOPPED)
    except Exception as exc:  # the last line of defence: one line, no traceback
        if args.debug:
            raise
        print(f"trainer: error: unexpected {type(exc).__name__}: {exc} (run with --debug for "
              "the traceback)", file=sys.stderr)
        return int(ExitCode.ERROR)
