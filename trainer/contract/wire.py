"""What the machine answers and orch reads: typed records, defined once.

The machine builds them and its entry prints them (``dataclasses.asdict``, framed:
trainer/machine/entry.py); orch reads them with :meth:`Record.from_json`, which checks every
field against its type: unknown keys are ignored, missing ones default (a machine of another
code version still answers), and a value of the wrong type (a number written as a string in a
hand-edited status.json, a crafted answer) is dropped and the field defaults, never trusted. A
field without a default that is missing or wrong makes the record unreadable (:class:`WireError`).
Standard library only.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar

from trainer.contract import layout
from trainer.contract.exitcodes import ExitCode

MAX_GPUS = 64  # rows read from nvidia-smi (a machine has up to 16)
MAX_FILE_SIZE = 1 << 62  # beyond any disk: a size above it is a crafted answer
DIED = "died"  # shown state: status.json says running (or nothing), but the process is gone
BROKEN = "broken"  # shown state: a file of its folder is a named pipe, a device... (never read)
STALLED = "stalled"  # shown state: running, but no sign of life for monitor.stall_seconds (or SIGSTOPped)
# shown state of a run known only from storage whose last mirrored state is running: its machine
# cannot tell whether it still runs
UNKNOWN_NOW = "running when last mirrored"
# Where a run lives (RunInfo.where): its machine, the storage mirror, or both.
ON_MACHINE, IN_STORAGE, BOTH = "machine", "storage", "both"
STALL_FLOOR = 600.0  # the default monitor.stall_seconds: the larger of this and 3 median epochs
NVIDIA_QUERY = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"

R = TypeVar("R", bound="Record")


class WireError(ValueError):
    """An answer that is not the record it should be."""


class _Invalid(Exception):
    pass


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (a scalar, ``X | None``, ``list[X]``, ``dict[str, X]``, a record);
    _Invalid when it is not one. Elements of a list or dict that do not fit are left out."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin is typing.Union or origin is getattr(types, "UnionType", typing.Union):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _decode(option, value)
            except (_Invalid, WireError):  # a nested record that is not one: the field defaults
                continue
        raise _Invalid
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid
        return [item for item in (_try(args[0], v) for v in value) if item is not _SKIP]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid
        decoded = {k: _try(args[1], v) for k, v in value.items() if isinstance(k, str)}
        return {k: v for k, v in decoded.items() if v is not _SKIP}
    if is_dataclass(kind):
        if not isinstance(value, dict):
            raise _Invalid
        return _record(kind, value)
    return _scalar(kind, value)


_SKIP = object()


def _try(kind: Any, value: Any) -> Any:
    try:
        return _decode(kind, value)
    except (_Invalid, WireError):
        return _SKIP


def _scalar(kind: Any, value: Any) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and number and isinstance(value, int):
        return value
    if kind is float and number:
        try:
            converted = float(value)
        except OverflowError:  # an integer beyond any float
            raise _Invalid from None
        if math.isfinite(converted):
            return converted
    if kind is str and isinstance(value, str):
        return value
    raise _Invalid


def _record(cls: type[R], d: dict[str, Any]) -> R:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in d:
            try:
                values[f.name] = _decode(hints[f.name], d[f.name])
                continue
            except _Invalid:
                pass
        if f.default is MISSING and f.default_factory is MISSING:
            raise WireError(f"{cls.__name__}.{f.name}: missing or not a {hints[f.name]}")
    return cls(**values)


class Record:
    """A wire record: ``to_json`` for the machine, ``from_json`` (checked) for orch."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[R], d: Any) -> R:
        if not isinstance(d, dict):
            raise WireError(f"{cls.__name__}: not a JSON object")
        return _record(cls, d)


# --------------------------------------------------------------------------- the host


@dataclass(frozen=True)
class GpuRow(Record):
    """One GPU as nvidia-smi reports it; None where it says [N/A] or [Not Supported]."""

    index: int
    name: str
    utilization: float | None = None  # %
    memory_used: float | None = None  # MiB
    memory_total: float | None = None  # MiB
    temperature: float | None = None  # C
    power: float | None = None  # W


def parse_nvidia_smi(csv_text: str) -> list[GpuRow]:
    """Rows of ``nvidia-smi --query-gpu=NVIDIA_QUERY --format=csv,noheader,nounits``."""

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None  # [N/A], [Not Supported], [Unknown Error]

    gpus: list[GpuRow] = []
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 7 or not (parts[0].isascii() and parts[0].isdigit()) or len(parts[0]) > 4:
            continue
        if len(gpus) == MAX_GPUS:
            break
        # A GPU name may itself hold commas: it is everything between the first field and the last five.
        gpus.append(GpuRow(int(parts[0]), ", ".join(parts[1:-5]), *(number(x) for x in parts[-5:])))
    return gpus


@dataclass(frozen=True)
class HostLoad(Record):
    cpus: int | None = None
    loadavg: list[float] | None = None
    mem_total_mb: int | None = None
    mem_available_mb: int | None = None


@dataclass(frozen=True)
class Host(Record):
    """The machine: its GPUs (or why none are listed) and its load."""

    gpus: list[GpuRow] = field(default_factory=list)
    gpu_error: str | None = None
    load: HostLoad = field(default_factory=HostLoad)


@dataclass(frozen=True)
class Home(Record):
    """The login's home folder: what ``~`` and relative paths in deploy.yaml mean there."""

    home: str


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class MirrorReport(Record):
    """The storage mirror's mirror.json (trainer/ml/mirror.py): what reached S3, or why not yet."""

    state: str | None = None  # "ok", "retrying", "starting"
    uri: str | None = None
    epoch: int | None = None  # the committed epoch S3 holds
    synced_at: float | None = None  # when it got there (seconds since the epoch)
    error: str | None = None  # the last failure, while it retries
    failures: int = 0  # failed passes in a row
    updated_at: float | None = None

    def describe(self) -> str:
        """'epoch 3 in s3://b/p' or 'retrying (3 failures): <error>'."""
        if self.state == "retrying":
            return f"uploads to {self.uri} failing ({self.failures} in a row, retried; training goes on): {self.error}"
        if self.epoch is None:
            return f"mirrored to {self.uri} (no committed epoch yet)"
        return f"epoch {self.epoch} is in {self.uri}"


# A run's recoveries (orch's recovery loop, recorded by the continued trainer in its committed state).
RECOVERY_KINDS = ("preempted", "restart")  # the instance was taken / the trainer failed on a live instance
MAX_RECOVERIES = 100  # kept per run (the last ones): a run recovered more often than this has other problems
MAX_RECOVERY_JSON = 4096  # characters of one record on the trainer's command line
MAX_WHY = 300  # characters of a recovery's reason
MAX_ID = 64  # characters of an instance id (i-0123456789abcdef0 is 19)
MAX_LOST_SECONDS = 10 * 365 * 86400.0  # beyond any recovery: a larger value is a crafted one


class RecoveryError(WireError):
    """A recovery record that is not one (the message says why); in a list read from a
    machine, such an item is left out."""


@dataclass(frozen=True)
class Recovery(Record):
    """One recovery of a run: when (ISO 8601), why, what kind, the instance it left and the one
    it continued on, the committed epoch it continued from, and the seconds it cost.

    Written by orch, but read back from a machine (status.json, the mirror): whoever builds
    one, its text is bounded and cleaned and its numbers checked here (a number out of range
    reads as unknown; a time that is not one, or an unknown kind, is no record: RecoveryError)."""

    at: str
    why: str
    kind: str = "preempted"
    old_instance: str | None = None
    new_instance: str | None = None
    epoch_restored: int | None = None
    lost_seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.at, str) or len(self.at) > 40 or _iso_time(self.at) is None:
            raise RecoveryError(f"at: not an ISO 8601 time: {str(self.at)[:40]!r}")
        if self.kind not in RECOVERY_KINDS:
            raise RecoveryError(f"kind: must be one of {', '.join(RECOVERY_KINDS)}, got {str(self.kind)[:40]!r}")
        bounded = {"why": _text(self.why, MAX_WHY) or "", "old_instance": _text(self.old_instance, MAX_ID),
                   "new_instance": _text(self.new_instance, MAX_ID)}
        epoch, lost = self.epoch_restored, self.lost_seconds
        bounded["epoch_restored"] = epoch if isinstance(epoch, int) and 0 <= epoch <= 10**9 else None
        bounded["lost_seconds"] = float(lost) if isinstance(lost, (int, float)) and 0 <= lost <= MAX_LOST_SECONDS \
            else None
        for name, value in bounded.items():
            object.__setattr__(self, name, value)

    @property
    def when(self) -> datetime:
        when = _iso_time(self.at)
        assert when is not None  # checked when the record was made
        return when

    @classmethod
    def parse(cls, text: str) -> Recovery:
        """The trainer's ``--record-recovery JSON``, strictly: one JSON object of this record's
        fields, each of its own type, no control characters, within the bounds (a value the
        reading side would shorten or drop is refused here: RecoveryError says why)."""
        if len(text) > MAX_RECOVERY_JSON:
            raise RecoveryError(f"too long ({len(text)} characters; at most {MAX_RECOVERY_JSON})")
        try:
            d = json.loads(text)
        except (ValueError, RecursionError):
            raise RecoveryError("not JSON") from None
        if not isinstance(d, dict):
            raise RecoveryError("must be a JSON object")
        hints = _hints(cls)
        unknown = sorted(k for k in d if k not in hints)
        if unknown:
            raise RecoveryError(f"unknown field {unknown[0][:40]!r}")
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING:
                    raise RecoveryError(f"{f.name}: missing")
                continue
            value = d[f.name]
            try:
                _decode(hints[f.name], value)
            except _Invalid:
                raise RecoveryError(f"{f.name}: must be {_type_name(hints[f.name])}, got {type(value).__name__}") \
                    from None
            if isinstance(value, str) and not value.isprintable():
                raise RecoveryError(f"{f.name}: holds control characters")
        record = cls(**d)
        if record.to_json() != {f.name: d.get(f.name, f.default) for f in fields(cls)}:
            changed = next(f.name for f in fields(cls) if getattr(record, f.name) != d.get(f.name, f.default))
            raise RecoveryError(f"{changed}: out of range or too long")
        return record


def _iso_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _text(value: str | None, limit: int) -> str | None:
    """Text from a record: non-printable characters (controls, bidi overrides) as '?', at most
    ``limit`` characters; None (and empty) stays None."""
    if not isinstance(value, str) or not value:
        return None
    if not value.isprintable():
        value = "".join(ch if ch.isprintable() else "?" for ch in value)
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _type_name(kind: Any) -> str:
    names = {str: "text", int: "an integer", float: "a number", type(None): "null"}
    return " or ".join(names.get(a, str(a)) for a in (typing.get_args(kind) or (kind,)))


# What EC2's spot instance-action notice may say (IMDS /latest/meta-data/spot/instance-action).
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
MAX_NOTICE_TIME = 40  # "2026-11-21T10:30:15Z" and its variants: a longer one is not EC2's


@dataclass(frozen=True)
class Interruption(Record):
    """A spot interruption notice as the watcher recorded it for a run (layout.INTERRUPTION, and
    status.json's ``interruption`` of an interrupted run). Checked when built: anything but one of
    EC2's actions and a short, printable time is not one (WireError)."""

    action: str
    notice_time: str | None = None  # EC2's: when the instance is to be interrupted (ISO 8601, UTC)
    noticed_at: float | None = None  # when the watcher saw it (seconds since the epoch, the machine's clock)

    def __post_init__(self) -> None:
        if self.action not in SPOT_ACTIONS:
            raise WireError(f"Interruption.action: {str(self.action)[:20]!r} is not one of {', '.join(SPOT_ACTIONS)}")
        time_ok = self.notice_time is None or (len(self.notice_time) <= MAX_NOTICE_TIME and self.notice_time.isascii()
                                               and self.notice_time.isprintable())
        if not time_ok:
            raise WireError("Interruption.notice_time: not a time EC2 would write")

    def describe(self) -> str:
        """'interrupted by a spot notice (terminate at 2026-11-21T10:32:15Z)'."""
        return f"interrupted by a spot notice ({self.action} at {self.notice_time or 'an unknown time'})"


@dataclass(frozen=True)
class RunInfo(Record):
    """One run as the machine sees it: status.json and run.json fields, and liveness."""

    run_id: str
    created: float | None = None  # when orch created the run folder (seconds since the epoch)
    state: str | None = None  # status.json's state; None before the trainer wrote one
    phase: str | None = None  # what a running trainer is doing ("loading data", "training")
    epoch: int | None = None
    epochs: int | None = None
    val_accuracy: float | None = None
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    error: str | None = None
    reason: str | None = None  # why a failed run failed, when it is one the exit codes name (layout.DISK_FULL)
    updated_at: str | None = None
    parent: str | None = None
    parent_best_val_accuracy: float | None = None
    vs_parent: float | None = None  # best_val_accuracy - the parent's
    beat_parent: bool | None = None  # did a checkpoint of this run beat the parent's best?
    started_at: str | None = None
    pid: int | None = None
    alive: bool = False  # the recorded pid lives, with the recorded start time
    launching: bool = False  # a launch holds the machine's lock: a run without a state may be starting
    broken: str | None = None  # why its folder cannot be read ("status.json is a named pipe")
    quiet_for: float | None = None  # seconds since its last sign of life (heartbeat, status), by the machine's clock
    stall_after: float | None = None  # quiet this long, a running trainer is stalled (monitor.stall_seconds)
    signal_stopped: bool = False  # its process is stopped by a signal (SIGSTOP, a debugger)
    mirror: MirrorReport | None = None  # the storage mirror's report (a run mirrored to S3)
    where: str = ON_MACHINE  # ON_MACHINE, IN_STORAGE or BOTH (orch sets it when it reads storage too)
    interruption: Interruption | None = None  # an interrupted run's spot notice (status.json)
    recoveries: list[Recovery] = field(default_factory=list)  # oldest first, the last MAX_RECOVERIES

    def __post_init__(self) -> None:
        if len(self.recoveries) > MAX_RECOVERIES:  # however it was built: bounded
            object.__setattr__(self, "recoveries", self.recoveries[-MAX_RECOVERIES:])

    @property
    def lost_seconds(self) -> float | None:
        """The seconds its recoveries cost, as far as they are known (None: no recovery says)."""
        known = [r.lost_seconds for r in self.recoveries if r.lost_seconds is not None]
        return round(sum(known), 3) if known else None

    @property
    def active(self) -> bool:
        """Its process is alive and has not written a final state (running, or starting)."""
        return self.alive and self.state in (None, layout.RUNNING)

    @property
    def shown_state(self) -> str | None:
        """The state users see: ``died`` when the process is gone without a final state (or
        never wrote one, unless a launch is under way)."""
        if self.broken:
            return BROKEN
        if self.where == IN_STORAGE and self.state in (None, layout.RUNNING):
            return UNKNOWN_NOW
        if self.stall is not None:
            return STALLED
        if not self.alive and (self.state == layout.RUNNING or (self.state is None and not self.launching)):
            return DIED
        return self.state

    @property
    def stall(self) -> str | None:
        """Why a running trainer is stalled ("stopped by a signal", "no sign of life for 12 min"), or None."""
        if not self.active:
            return None
        if self.signal_stopped:
            return "its process is stopped by a signal (SIGSTOP?): `kill -CONT` it, or `orch stop` it"
        if self.quiet_for is not None and self.stall_after is not None and self.quiet_for > self.stall_after:
            return (f"no sign of life for {self.quiet_for / 60:.1f} min (monitor.stall_seconds: "
                    f"{self.stall_after:.0f} s): deadlocked, or waiting on a hung disk?")
        return None

    @property
    def final(self) -> bool:
        """It has ended (finished, failed, stopped, or died)."""
        return self.shown_state in ENDED

    @property
    def exit_code(self) -> ExitCode:
        """How it ended, as the exit code of a command that followed it (OK while it runs)."""
        if self.shown_state == layout.FAILED and self.reason == layout.DISK_FULL:
            return ExitCode.DISK_FULL
        return ENDED.get(self.shown_state or "", ExitCode.OK)


def accuracy_text(value: float | None, none: str = "-") -> str:
    """An accuracy as both halves show it: 4 decimals (0.5092), ``none`` before there is one."""
    return none if value is None else f"{value:.4f}"


def best_epoch_text(epoch: int | None) -> str:
    """The best checkpoint's epoch as both halves show it: an extended run's epoch 0 is its
    parent's weights (it has not beaten them), which "epoch 0" alone does not say."""
    return "epoch 0, the parent's weights" if epoch == 0 else f"epoch {epoch}"


def run_fields(run_id: str, status: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """RunInfo's fields from a run's status.json and run.json (unchecked: from_json checks),
    wherever they were read: the machine's folder, or the storage mirror."""
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return dict(
        run_id=run_id, state=status.get("state"), phase=status.get("phase"),
        epoch=status.get("epoch"), epochs=status.get("epochs"), val_accuracy=status.get("val_accuracy"),
        best_val_accuracy=status.get("best_val_accuracy"), best_epoch=status.get("best_epoch"),
        error=status.get("error"), reason=status.get("reason"), updated_at=status.get("updated_at"),
        parent=run.get("parent_run", status.get("parent")),
        parent_best_val_accuracy=status.get("parent_best_val_accuracy", config.get("parent_best_val_accuracy")),
        vs_parent=status.get("vs_parent"), beat_parent=status.get("beat_parent"), started_at=run.get("started_at"),
        recoveries=_last(status.get("recoveries"), MAX_RECOVERIES), interruption=status.get("interruption"))


def _last(value: Any, n: int) -> list[Any]:
    """The last ``n`` items of a list (before they are decoded: a crafted list costs no more);
    [] for anything else."""
    return value[-n:] if isinstance(value, list) else []


# How a run ended -> the exit code of `orch monitor`, `deploy --follow`, `stop`.
ENDED = {layout.FINISHED: ExitCode.OK, layout.FAILED: ExitCode.RUN_FAILED, layout.STOPPED: ExitCode.RUN_STOPPED,
         layout.INTERRUPTED: ExitCode.RUN_STOPPED,
         DIED: ExitCode.RUN_DIED, BROKEN: ExitCode.REMOTE}


@dataclass(frozen=True)
class RunList(Record):
    runs: list[RunInfo] = field(default_factory=list)


@dataclass(frozen=True)
class Epoch(Record):
    """One line of metrics.jsonl (layout.METRIC_KEYS): a committed epoch."""

    epoch: int
    loss: float | None = None
    accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    lr: float | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Snapshot(Record):
    """Everything one monitor refresh shows, from ONE remote command."""

    run: RunInfo
    metrics: list[Epoch] = field(default_factory=list)  # metrics.jsonl lines from the offset on
    metrics_count: int = 0  # lines in metrics.jsonl
    log_tail: list[str] = field(default_factory=list)
    host: Host = field(default_factory=Host)
    # when the machine's watcher saw EC2's rebalance recommendation (noticeTime), None: none seen
    rebalance_at: str | None = None


@dataclass(frozen=True)
class RunFiles(Record):
    """A run directory as `orch download` reads it: its MANIFEST.sha256 and every regular file
    below it, reached without following a link, with its size. Never trusted blindly: orch
    checks every manifest entry against these files and against its own destination."""

    manifest: str | None = None  # None: no manifest, or not a regular file
    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    too_big: bool = False  # more files, or a bigger manifest, than any run holds: a crafted run
    run: RunInfo | None = None  # None: no such run folder (or a link, not a folder of its own)

    @classmethod
    def from_json(cls, d: Any) -> RunFiles:
        files = super().from_json(d)
        # A size that is not a count leaves its file out (it is then "not a regular file of the run").
        sizes = {k: v for k, v in files.files.items() if 0 <= v < MAX_FILE_SIZE}
        return RunFiles(files.manifest, sizes, files.too_big, files.run)


@dataclass(frozen=True)
class StartCheck(Record):
    """Right after a launch: what the new trainer (pid) has written so far."""

    state: str | None = None  # status.json's state, when the new process wrote it
    alive: bool = False
    log_tail: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LaunchAnswer(Record):
    """The launcher's answer: the trainer's pid, or why nothing was started (``error`` is a kind:
    busy, exists, missing)."""

    pid: int | None = None
    error: str | None = None
    message: str | None = None
    autostop: Autostop | None = None  # armed (or disarmed) in the same step, before the trainer started
    launched_at: float | None = None  # by the machine's clock


@dataclass(frozen=True)
class Signalled(Record):
    """``signal``: whether the run's trainer was sent SIGTERM (its pid and start time checked)."""

    sent: bool
    pid: int | None = None
    message: str | None = None


@dataclass(frozen=True)
class Delivery(Record):
    """``notify test``: whether the webhook took the message (an HTTP 2xx), after how many tries.
    ``target`` is the URL redacted (trainer/contract/notify.py): never the secret."""

    delivered: bool = False
    status: int | None = None  # the last HTTP status (None: no answer at all)
    attempts: int = 0
    error: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Removed(Record):
    """``remove``: the run folders deleted, those refused (id -> why) and those not there."""

    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- setting up


@dataclass(frozen=True)
class EnvAnswer(Record):
    """The managed environment: its interpreter (None: not built, with --check), or why not."""

    python: str | None = None
    key: str | None = None
    built: bool = False
    gpus: int = 0  # as nvidia-smi listed them (-1: it is there but fails)
    error: str | None = None
    log: str | None = None  # the pip log on the machine
    log_tail: list[str] = field(default_factory=list)
    disk_full: bool = False  # it failed for want of disk space


@dataclass(frozen=True)
class SetupResult(Record):
    """remote.setup: whether it ran now (else it had run for this code version), and how."""

    ran: bool = False
    code: int = 0
    log_tail: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CodeState(Record):
    present: bool = False  # the code version is unpacked, whole


@dataclass(frozen=True)
class DataListing(Record):
    """The data folder's regular files: base64 of NUL-separated (name, size, mtime) records
    (names are bytes; an answer is text)."""

    listing: str = ""
    busy: str | None = None  # another upload into the folder is under way: nothing listed


@dataclass(frozen=True)
class Moved(Record):
    """An upload's files moved into place; or why it could not be unpacked (nothing moved)."""

    files: int = 0
    error: str | None = None
    disk_full: bool = False  # it failed for want of disk space on the machine
    busy: str | None = None  # another upload into the folder is under way: nothing unpacked


@dataclass(frozen=True)
class PythonInfo(Record):
    executable: str = ""
    version: str = ""


@dataclass(frozen=True)
class NvidiaInfo(Record):
    count: int = 0
    names: list[str] = field(default_factory=list)
    driver: str | None = None
    cuda: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class TensorflowCheck(Record):
    gpus: int | None = None  # the GPUs TensorFlow sees (None: it does not import)
    built_with_cuda: bool | None = None
    error: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class DataCheck(Record):
    dir: str = ""
    exists: bool = False
    feature_files: int = 0
    labelled: int = 0


@dataclass(frozen=True)
class DiskCheck(Record):
    path: str = ""
    free_bytes: int = 0
    total_bytes: int = 0
    writable: bool = True  # this user can create files there (remote.root, or its nearest existing parent)


@dataclass(frozen=True)
class Preflight(Record):
    """Can this interpreter train here: versions, GPUs, TensorFlow, data, disk."""

    python: PythonInfo = field(default_factory=PythonInfo)
    packages: dict[str, str | None] = field(default_factory=dict)  # name -> version (None: missing)
    nvidia: NvidiaInfo = field(default_factory=NvidiaInfo)
    tensorflow: TensorflowCheck | None = None  # None: TensorFlow or Keras is not installed
    data: DataCheck = field(default_factory=DataCheck)
    disk: DiskCheck = field(default_factory=DiskCheck)


# --------------------------------------------------------------------------- autostop


@dataclass(frozen=True)
class Autostop(Record):
    """The machine's autostop: the setting, and what its watcher last saw (times: seconds
    since the epoch, by the machine's clock; ``now`` is that clock when asked)."""

    armed: bool = False
    idle_minutes: float | None = None
    command: str | None = None
    watcher_alive: bool = False
    idle_since: float | None = None
    stops_at: float | None = None
    fired_at: float | None = None
    error: str | None = None  # the command's last failure (it is tried again)
    now: float | None = None


@dataclass(frozen=True)
class MachineReport(Record):
    """`orch status`'s question, one answer: the host, every run, the autostop."""

    host: Host = field(default_factory=Host)
    runs: list[RunInfo] = field(default_factory=list)
    autostop: Autostop = field(default_factory=Autostop)


# --------------------------------------------------------------------------- TensorBoard


@dataclass(frozen=True)
class TensorBoardAnswer(Record):
    """``tensorboard``: the one TensorBoard of remote.root serving the runs asked for, on
    127.0.0.1:``port`` there (``reused``: it was already running), or why not (``error`` is a
    kind: missing, busy, port, failed; ``message`` says it in words)."""

    port: int | None = None
    pid: int | None = None
    reused: bool = False
    error: str | None = None
    message: str | None = None
