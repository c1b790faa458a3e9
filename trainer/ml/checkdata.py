"""``check-data``: what is in a data directory, what is usable, and why the rest is not."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from trainer.ml.dataset import Dataset, SkipReason
from trainer.ml.stats import find_stats, stats_problem

EXAMPLES = 3


def printable(name: str) -> str:
    """A file name as a terminal shows it safely: bytes that are not UTF-8 as \\xNN, control
    characters (a newline, an escape sequence) escaped, so one name stays one line."""
    try:
        text = os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate no file system produced
        text = name.encode("utf-8", "backslashreplace").decode()
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def report(ds: Dataset, stats_dir: Path | None = None) -> dict[str, Any]:
    """Everything check-data shows, as one JSON-ready dict."""
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    speakers: dict[str, set[str]] = defaultdict(set)
    for s in ds.samples:
        labels[s.corpus][s.label] += 1
        if s.speaker is not None:
            speakers[s.corpus].add(s.speaker)
    by_reason: dict[SkipReason, list[str]] = defaultdict(list)
    for sk in ds.skipped:
        by_reason[sk.reason].append(sk.rel + (f" ({sk.detail})" if sk.detail else ""))
    lengths = ds.lengths()
    unrecognized = by_reason.get(SkipReason.UNRECOGNIZED_NAME, [])
    return {
        "data_dir": str(ds.root),
        "files": ds.scan.files_by_kind,
        "links": ds.scan.links,
        "patterns": ds.scan.patterns,
        "unrecognized_examples": unrecognized[:EXAMPLES],
        "classes": list(ds.classes),
        "usable": len(ds.samples),
        "skipped": len(ds.skipped),
        "labels": {c: dict(sorted(v.items())) for c, v in sorted(labels.items())},
        "speakers": {c: len(v) for c, v in sorted(speakers.items())},
        "array_keys": ds.scan.array_keys,
        "shapes": ds.scan.shapes,
        "feature_shape": list(ds.feature_shape),
        "frames": (
            {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())}
            if len(lengths) else None
        ),
        "skip_reasons": {
            r.value: {"count": len(v), "description": r.description, "examples": v[:EXAMPLES]}
            for r, v in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
        },
        "stats_files": _stats_report(ds, stats_dir),
        "cache": ds.cache,
    }


def _stats_report(ds: Dataset, stats_dir: Path | None) -> dict[str, Any]:
    where = stats_dir if stats_dir is not None else find_stats(ds.root)
    if where is None:
        return {"found": False, "dir": None, "valid": False,
                "problem": "none found: they will be computed from the training split"}
    if not ds.feature_shape:
        return {"found": True, "dir": str(where), "valid": False,
                "problem": "no usable features to check against"}
    problem = stats_problem(where, ds.feature_shape)
    return {"found": True, "dir": str(where), "valid": problem is None, "problem": problem}


def render(rep: dict[str, Any], console: Any) -> None:
    """Print the report as rich tables."""
    from rich.markup import escape
    from rich.table import Table

    def name(text: str) -> str:  # a file name is shown as it is, never as markup
        return escape(printable(text))

    console.print(f"[bold]Data directory[/bold] {name(rep['data_dir'])}")
    files = rep["files"]
    links = f" ({rep['links']} through symbolic links)" if rep.get("links") else ""
    console.print(
        "Files: " + ", ".join(f"{files.get(k, 0)} {k}" for k in ("npz", "npy", "stats", "other")) + links
    )
    pat = rep["patterns"]
    console.print(
        "Name patterns: " + ", ".join(f"{pat.get(k, 0)} {k}" for k in ("ravdess", "cremad", "folder", "none"))
    )
    for ex in rep["unrecognized_examples"]:
        console.print(f"  not recognised: {name(ex)}")

    table = Table(title=f"Usable samples by label ({rep['usable']} in all)")
    table.add_column("label")
    corpora = list(rep["labels"])
    for c in corpora:
        table.add_column(f"{c} ({rep['speakers'].get(c, 0)} speakers)", justify="right")
    table.add_column("total", justify="right")
    for label in rep["classes"]:
        row = [rep["labels"][c].get(label, 0) for c in corpora]
        table.add_row(label, *map(str, row), str(sum(row)))
    console.print(table)

    console.print(
        "Arrays: keys " + ", ".join(f"{k}={v}" for k, v in rep["array_keys"].items())
        + "; shapes " + ", ".join(f"{k}={v}" for k, v in rep["shapes"].items())
    )
    if rep["frames"]:
        f = rep["frames"]
        console.print(
            f"Per-frame feature shape {tuple(rep['feature_shape'])}; frames per file "
            f"min {f['min']}, median {f['median']:g}, max {f['max']}"
        )
    if rep["skip_reasons"]:
        skips = Table(title=f"Skipped files ({rep['skipped']})")
        for col in ("reason", "count", "meaning", "examples"):
            skips.add_column(col, overflow="fold")
        for reason, info in rep["skip_reasons"].items():
            skips.add_row(reason, str(info["count"]), info["description"], "\n".join(map(name, info["examples"])))
        console.print(skips)
    st = rep["stats_files"]
    if st["found"] and st["valid"]:
        console.print(f"Normalization statistics: found and valid in {name(st['dir'])}")
    elif st["found"]:
        console.print(f"[red]Normalization statistics in {name(st['dir'])} are unusable:[/red] {name(st['problem'])}")
    else:
        console.print(f"Normalization statistics: {st['problem']}")
