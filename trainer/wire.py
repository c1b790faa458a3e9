"""What the probe (on the machine) answers and orch reads: typed records, defined once.

Pure Python (no numpy, no TensorFlow). Each record has ``to_json`` (what the probe prints)
and ``from_json`` (what orch parses; unknown keys are ignored, missing ones default, so a
probe of another code version still answers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trainer import layout

DIED = "died"  # shown state: status.json says running (or nothing), but the process is gone
NVIDIA_QUERY = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class GpuRow:
    """One GPU as nvidia-smi reports it; None where it says [N/A] or [Not Supported]."""

    index: int
    name: str
    utilization: float | None  # %
    memory_used: float | None  # MiB
    memory_total: float | None  # MiB
    temperature: float | None  # C
    power: float | None  # W

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GpuRow:
        return cls(**_known(cls, d))


def parse_nvidia_smi(csv_text: str) -> list[GpuRow]:
    """Rows of ``nvidia-smi --query-gpu=NVIDIA_QUERY --format=csv,noheader,nounits``."""

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None  # [N/A], [Not Supported], [Unknown Error]

    gpus = []
    for line in csv_text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 7 or not parts[0].isdigit():
            continue
        # A GPU name may itself hold commas: it is everything between the first field and the last five.
        gpus.append(GpuRow(int(parts[0]), ", ".join(parts[1:-5]), *(number(x) for x in parts[-5:])))
    return gpus


@dataclass(frozen=True)
class HostLoad:
    cpus: int | None = None
    loadavg: list[float] | None = None
    mem_total_mb: int | None = None
    mem_available_mb: int | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> HostLoad:
        return cls(**_known(cls, d or {}))


@dataclass(frozen=True)
class Host:
    """The machine: its GPUs (or why none are listed) and its load."""

    gpus: list[GpuRow] = field(default_factory=list)
    gpu_error: str | None = None
    load: HostLoad = field(default_factory=HostLoad)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Host:
        return cls([GpuRow.from_json(g) for g in d.get("gpus") or []], d.get("gpu_error"),
                   HostLoad.from_json(d.get("load")))


@dataclass(frozen=True)
class RunInfo:
    """One run as the machine sees it: status.json and run.json fields, and liveness."""

    run_id: str
    created: float | None = None  # when orch created the run folder (seconds since the epoch)
    state: str | None = None  # status.json's state; None before the trainer wrote one
    epoch: int | None = None
    epochs: int | None = None
    val_accuracy: float | None = None
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    error: str | None = None
    updated_at: str | None = None
    parent: str | None = None
    parent_best_val_accuracy: float | None = None
    vs_parent: float | None = None  # best_val_accuracy - the parent's
    beat_parent: bool | None = None  # did a checkpoint of this run beat the parent's best?
    started_at: str | None = None
    pid: int | None = None
    alive: bool = False  # the recorded pid lives, with the recorded start time
    launching: bool = False  # a launch holds the machine's lock: a run without a state may be starting

    @property
    def active(self) -> bool:
        """Its process is alive and has not written a final state (running, or starting)."""
        return self.alive and self.state in (None, layout.RUNNING)

    @property
    def shown_state(self) -> str | None:
        """The state users see: ``died`` when the process is gone without a final state (or
        never wrote one, unless a launch is under way)."""
        if not self.alive and (self.state == layout.RUNNING or (self.state is None and not self.launching)):
            return DIED
        return self.state

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunInfo:
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class Autostop:
    """The machine's autostop: the setting, and what its watcher last saw (times: seconds
    since the epoch, by the machine's clock; ``now`` is that clock when asked)."""

    armed: bool = False
    idle_minutes: float | None = None
    command: str | None = None
    watcher_alive: bool = False
    idle_since: float | None = None
    stops_at: float | None = None
    fired_at: float | None = None
    now: float | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Autostop:
        return cls(**_known(cls, d or {}))


@dataclass(frozen=True)
class Machine:
    """`orch status`'s question, one answer: the host, every run, the autostop."""

    host: Host
    runs: list[RunInfo]
    autostop: Autostop

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Machine:
        return cls(Host.from_json(d.get("host") or {}), [RunInfo.from_json(r) for r in d.get("runs") or []],
                   Autostop.from_json(d.get("autostop")))


@dataclass(frozen=True)
class Snapshot:
    """Everything one monitor refresh shows, from ONE remote command."""

    run: RunInfo
    status: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines from the offset on
    metrics_count: int = 0  # lines in metrics.jsonl
    log_tail: list[str] = field(default_factory=list)
    host: Host = field(default_factory=Host)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Snapshot:
        return cls(RunInfo.from_json(d["run"]), d.get("status") or {}, d.get("metrics") or [],
                   int(d.get("metrics_count") or 0), d.get("log_tail") or [], Host.from_json(d.get("host") or {}))


@dataclass(frozen=True)
class RunFiles:
    """A run directory as `orch download` reads it: its MANIFEST.sha256 and every regular file
    below it, reached without following a link, with its size. Never trusted blindly: orch
    checks every manifest entry against these files and against its own destination."""

    manifest: str | None = None  # None: no manifest, or not a regular file
    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    too_big: bool = False  # more files, or a bigger manifest, than any run holds: a crafted run
    run: RunInfo | None = None  # None: no such run folder (or a link, not a folder of its own)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunFiles:
        files = d.get("files") if isinstance(d.get("files"), dict) else {}
        manifest = d.get("manifest") if isinstance(d.get("manifest"), str) else None
        # An answer is input like any other: a size that is not a count leaves its file out.
        sizes = {str(k): v for k, v in files.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        run = RunInfo.from_json(d["run"]) if isinstance(d.get("run"), dict) else None
        return cls(manifest, sizes, bool(d.get("too_big")), run)
