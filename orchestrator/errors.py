"""One exception hierarchy for orch, mapped to exit codes in one place (orchestrator.cli)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # unexpected failure
    USAGE = 2  # bad option or bad deploy.yaml
    AWS = 3  # credentials, instance not found / terminated / ambiguous
    CONNECT = 4  # cannot reach or authenticate to the machine
    HOST_KEY = 5  # unknown or changed SSH host key
    BUSY = 6  # another run is still running on the machine
    REMOTE = 7  # a remote step failed (sync, setup, launch)
    RUN_FAILED = 8  # the training run ended failed
    RUN_STOPPED = 9  # the training run was stopped
    RUN_DIED = 10  # the process died without writing a final state
    INTERRUPTED = 130


class OrchError(Exception):
    """An error with a one-line message saying what is wrong and what to do."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(OrchError):
    exit_code = ExitCode.USAGE


class AwsError(OrchError):
    exit_code = ExitCode.AWS


class ConnectError(OrchError):
    exit_code = ExitCode.CONNECT


class ConnectionLost(ConnectError):
    """An established connection dropped in the middle of a command."""


class HostKeyError(OrchError):
    exit_code = ExitCode.HOST_KEY


class BusyError(OrchError):
    exit_code = ExitCode.BUSY


class RemoteError(OrchError):
    exit_code = ExitCode.REMOTE
