"""Processes on the machine: is the trainer that wrote a pid file still alive? Standard library only."""

from __future__ import annotations

import os
from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a living ``pid`` (clock ticks since boot), to tell pid
    reuse apart; None when there is no such process, or only its zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces, so count after its ')': field 3 is the
    # state (Z/X: dead, waiting to be reaped), field 22 the start time.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def pid_line(pid: int) -> str:
    """What a pid file holds: ``<pid> <start time>``."""
    start = process_start_time(pid)
    return f"{pid} {start if start is not None else ''}\n"


def pid_alive(pid_file: Path) -> tuple[int | None, bool]:
    """(pid, alive) for a pid file: alive only if that pid lives with the recorded start time."""
    try:
        parts = pid_file.read_text().split()
        pid = int(parts[0])
    except (OSError, ValueError, IndexError):
        return None, False
    recorded = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    current = process_start_time(pid)
    if current is not None or recorded is not None:
        return pid, current is not None and current == recorded
    try:  # no /proc (not Linux): existence is all we can check
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid, False
    except PermissionError:
        return pid, True
    return pid, True
