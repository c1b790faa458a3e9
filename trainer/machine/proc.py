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


def started_at(pid: int) -> float | None:
    """When a living process started, in seconds since the epoch (boot time + its start ticks)."""
    ticks = process_start_time(pid)
    if ticks is None:
        return None
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def stopped_by_signal(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, SIGTSTP, a debugger): state T or t in /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def pid_line(pid: int) -> str:
    """What a pid file holds: ``<pid> <start time>``."""
    start = process_start_time(pid)
    return f"{pid} {start if start is not None else ''}\n"


def pid_alive(pid_file: Path) -> tuple[int | None, bool]:
    """(pid, alive) for a pid file: alive only if that pid lives with the recorded start time."""
    from trainer.machine.readers import read_bytes

    try:
        parts = read_bytes(pid_file, 64).decode("ascii").split()
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


def bounded_output(argv: list[str], max_bytes: int = 64 << 10, timeout: float = 5.0) -> tuple[int | None, str]:
    """Run a tool of the machine's (nvidia-smi) for at most ``timeout`` seconds and ``max_bytes``
    of output (stdout and stderr together): (its exit code, or None when it was stopped for
    running too long or saying too much; what it said). FileNotFoundError when it is not there."""
    import contextlib
    import select
    import signal
    import subprocess
    import time

    # Its own session: when it is stopped, whatever it started goes with it.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while len(out) <= max_bytes:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                break  # too slow
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                try:
                    return proc.wait(max(0.0, deadline - time.monotonic())), out.decode("utf-8", "replace")
                except subprocess.TimeoutExpired:
                    break  # it closed its output but goes on
            out += chunk
        return None, out[:max_bytes].decode("utf-8", "replace")
    finally:
        with contextlib.suppress(OSError):  # whatever it started goes too, even if it has exited itself
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
