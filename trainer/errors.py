"""One exception hierarchy for the trainer; the CLI maps it to exit codes in one place."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure
    USAGE = 2  # bad option or bad configuration
    NO_DATA = 3  # the data directory holds nothing usable
    TRAINING_FAILED = 4  # NaN loss or another numerical failure
    STOPPED = 5  # stopped by SIGTERM / SIGINT (state saved)


class TrainerError(Exception):
    """An error with a one-line message meant for the user."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(TrainerError):
    exit_code = ExitCode.USAGE


class DataError(TrainerError):
    """The data directory, a statistics file or a split file is unusable."""

    exit_code = ExitCode.NO_DATA


class TrainingFailed(TrainerError):
    exit_code = ExitCode.TRAINING_FAILED
