"""One exception hierarchy for the trainer; the CLI maps it to exit codes in one place
(codes shared with orch: trainer/contract/exitcodes.py)."""

from __future__ import annotations

from trainer.contract.exitcodes import ExitCode

__all__ = ["DataError", "DiskFull", "ExitCode", "RunBusy", "TrainerError", "TrainingFailed", "UsageError"]


class TrainerError(Exception):
    """An error with a one-line message meant for the user."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(TrainerError):
    exit_code = ExitCode.USAGE


class DataError(TrainerError):
    """The data directory, a statistics file or a split file is unusable."""

    exit_code = ExitCode.NO_DATA


class TrainingFailed(TrainerError):
    exit_code = ExitCode.RUN_FAILED


class RunBusy(TrainerError):
    """Another trainer holds the run directory's lock."""

    exit_code = ExitCode.BUSY


class DiskFull(TrainerError):
    """No space left while writing the run directory; the last committed epoch is kept."""

    exit_code = ExitCode.DISK_FULL
