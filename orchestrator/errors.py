"""One exception hierarchy for orch, mapped to exit codes in one place (orchestrator.cli).
The codes themselves are shared with the trainer: trainer/contract/exitcodes.py."""

from __future__ import annotations

from trainer.contract.exitcodes import ExitCode

__all__ = ["AwsError", "BusyError", "ConfigError", "ConnectError", "ConnectionLost", "DiskFull", "ExitCode",
           "HostKeyError", "InstanceStopped", "NoCapacity", "NoData", "NotReady", "OrchError", "RemoteError"]


class OrchError(Exception):
    """An error with a one-line message saying what is wrong and what to do."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(OrchError):
    """A bad option, argument or deploy.yaml."""

    exit_code = ExitCode.USAGE


class NoSuchRun(ConfigError):
    """The run asked for is not where it was looked for (the machine, or the storage mirror)."""


class AwsError(OrchError):
    exit_code = ExitCode.AWS

    def __init__(self, message: str, code: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.code = code  # AWS's error code, when AWS answered with one
        self.detail = detail  # AWS's own words, on one line ("code: message")


class NoCapacity(AwsError):
    """EC2 refused to create (or start) an instance for want of capacity, or not at the price
    asked (spot): a refusal that passes, which a recovery retries with backoff; nothing else."""


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


class InstanceStopped(OrchError):
    """The instance is stopped and this command must not start it (it would cost money)."""

    exit_code = ExitCode.INSTANCE_STOPPED


class NotReady(OrchError):
    """The machine cannot train yet (preflight): no TensorFlow, no GPU visible, no data, no disk."""

    exit_code = ExitCode.NOT_READY


class NoData(OrchError):
    """The data folder on the machine is missing or holds no usable feature file."""

    exit_code = ExitCode.NO_DATA


class DiskFull(OrchError):
    exit_code = ExitCode.DISK_FULL
