"""Deleting runs on the machine (verb ``remove``, `orch rm`):

    remove ROOT RUN_ID...                   -> Removed

Under the machine's launch lock (no launch continues a run while it goes). Each RUN_ID must be a
run id, never a path (``../x``, ``a/b`` are refused), so only ``ROOT/runs/RUN_ID`` can go. A run
whose trainer lives (its pid, or its run lock held: a trainer started by hand too) is refused.
Otherwise the folder is renamed to a hidden name first (a listing never shows half a run), then
deleted without following a link (a run folder that is a link loses the link, never its
target); the run's webhook settings go with it. Standard library only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.wire import Removed
from trainer.machine.locks import is_locked, lock
from trainer.machine.probe import describe_run

LOCK_WAIT = 60.0  # seconds to wait for a launch in progress
TRASH = ".orch-removing-"  # a run folder on its way out (hidden: listings skip dot names)


def _why_not(run_dir: Path) -> str | None:
    """Why this run folder must stay, or None."""
    if not run_dir.is_dir():
        return "not a run folder"
    run = describe_run(run_dir)
    if run.alive or is_locked(run_dir / layout.RUN_LOCK):
        return f"its trainer is still running (pid {run.pid}): `orch stop {run_dir.name}` first"
    return None


def remove(root: Path, run_ids: list[str]) -> Removed:
    removed: list[str] = []
    refused: dict[str, str] = {}
    missing: list[str] = []
    runs = root / layout.RUNS_DIR
    bad = [r for r in run_ids if not layout.is_run_id(r)]
    refused.update({r[:100]: "not a run id (letters, digits, '.', '_' and '-', never a path)" for r in bad})
    wanted = [r for r in dict.fromkeys(run_ids) if layout.is_run_id(r)]
    if not runs.is_dir():
        return Removed([], refused, wanted)
    fd = lock(root / layout.LAUNCH_LOCK, wait=LOCK_WAIT)
    if fd is None:
        return Removed([], refused | {r: "another launch holds the machine's launch lock" for r in wanted}, [])
    try:
        for run_id in wanted:
            run_dir = runs / run_id
            if run_dir.is_symlink():
                run_dir.unlink()  # the link, never what it points to
            elif not run_dir.exists():
                missing.append(run_id)
                continue
            elif (why := _why_not(run_dir)) is not None:
                refused[run_id] = why
                continue
            else:
                trash = runs / f"{TRASH}{run_id}-{os.getpid()}"
                os.rename(run_dir, trash)
                try:
                    shutil.rmtree(trash)
                except OSError as exc:
                    refused[run_id] = f"removed from the runs, but {trash} is left ({exc.strerror or exc})"
                    continue
            Path(layout.notify_settings(str(root), run_id)).unlink(missing_ok=True)
            removed.append(run_id)
    finally:
        os.close(fd)
    return Removed(removed, refused, missing)


def run(verb: str, args: list[str], out: Any) -> int:
    if len(args) < 2:
        raise SystemExit("usage: python3 -m trainer.machine FRAME remove ROOT RUN_ID...")
    out.answer(remove(Path(args[0]), args[1:]))
    return 0
