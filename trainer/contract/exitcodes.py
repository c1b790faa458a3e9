"""Exit codes of both programs, ``orch`` and ``python -m trainer``, in ONE table: a code
means the same thing whichever program returns it. Pure Python (both halves import it)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    AWS = 3
    CONNECT = 4
    HOST_KEY = 5
    BUSY = 6
    REMOTE = 7
    RUN_FAILED = 8
    RUN_STOPPED = 9
    RUN_DIED = 10
    INSTANCE_STOPPED = 11
    NOT_READY = 12
    NO_DATA = 13
    DISK_FULL = 14
    INTERRUPTED = 130


# code -> (what it means, which program returns it)
MEANINGS: dict[ExitCode, tuple[str, str]] = {
    ExitCode.OK: ("success", "both"),
    ExitCode.ERROR: ("an unexpected internal error (a bug: run again with --debug and report it)", "both"),
    ExitCode.USAGE: ("bad option, argument or configuration file", "both"),
    ExitCode.AWS: ("AWS: credentials, region, instance missing, terminated or ambiguous", "orch"),
    ExitCode.CONNECT: ("cannot reach or log in to the machine", "orch"),
    ExitCode.HOST_KEY: ("unknown, changed or revoked SSH host key", "orch"),
    ExitCode.BUSY: ("busy: a run is active, or another launch or trainer holds the lock", "both"),
    ExitCode.REMOTE: ("a step on the machine failed (sync, environment, launch)", "orch"),
    ExitCode.RUN_FAILED: ("the training run failed (NaN loss, bad weights, ...)", "both"),
    ExitCode.RUN_STOPPED: ("the training run was stopped (SIGTERM/SIGINT; it can continue)", "both"),
    ExitCode.RUN_DIED: ("the training process died without a final state (killed, out of memory)", "orch"),
    ExitCode.INSTANCE_STOPPED: ("the EC2 instance is stopped and this command does not start it", "orch"),
    ExitCode.NOT_READY: ("the machine is not ready to train (preflight: Python, TensorFlow, GPU, disk)", "orch"),
    ExitCode.NO_DATA: ("no usable data: the data folder is missing or holds no usable feature file", "both"),
    ExitCode.DISK_FULL: ("no space left on a device (what was committed is kept)", "both"),
    ExitCode.INTERRUPTED: ("interrupted (Ctrl-C)", "orch"),
}


def help_table(program: str) -> str:
    """The table as lines for --help (codes the given program can return)."""
    rows = [f"{int(code):>3}  {meaning}" for code, (meaning, who) in MEANINGS.items() if who in ("both", program)]
    return "\n".join(rows)
