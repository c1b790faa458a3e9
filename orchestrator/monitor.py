"""``orch monitor``: a live view of one run, its refreshes answered by ONE long-lived remote
command (orchestrator.machine.Snapshots): a round trip on the open connection each."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.context import Context
from orchestrator.errors import ConnectError, ConnectionLost, ExitCode
from orchestrator.machine import IDLE, Snapshots
from orchestrator.provision import acquire
from orchestrator.runs import compared_with_parent, recovered
from orchestrator.terminal import clean
from trainer.contract import layout
from trainer.contract.wire import DIED, STALLED, Epoch, Host, RunInfo, Snapshot, best_epoch_text

LOG_LINES = 10
EXIT_WAIT_REFRESHES = 25  # x 0.2 s: how long the last frame waits for a finished trainer to exit
SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 30) -> str:
    values = [v for v in values[-width:] if v == v]  # drop NaN
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)


@dataclass
class RunView:
    """What monitor knows of a run, grown one snapshot at a time."""

    run_id: str
    history: list[Epoch] = field(default_factory=list)
    run: RunInfo | None = None
    host: Host = field(default_factory=Host)
    log_tail: list[str] = field(default_factory=list)
    note: str | None = None  # e.g. "reconnecting"
    rebalance_at: str | None = None  # EC2 recommended rebalancing (the machine's watcher saw it)

    def update(self, snap: Snapshot) -> None:
        if snap.metrics_count < len(self.history):  # metrics.jsonl was rewritten (a continued run)
            self.history = self.history[: snap.metrics_count - len(snap.metrics)]
        self.history += snap.metrics
        self.run, self.host, self.log_tail = snap.run, snap.host, snap.log_tail
        self.rebalance_at = snap.rebalance_at
        self.note = None

    @property
    def alive(self) -> bool:
        return self.run is not None and self.run.alive

    @property
    def info(self) -> RunInfo:
        return self.run if self.run is not None else RunInfo(self.run_id)

    @property
    def state(self) -> str | None:
        return self.info.shown_state if self.run is not None else None

    @property
    def final(self) -> bool:
        return self.run is not None and self.run.final

    @property
    def exit_code(self) -> ExitCode:
        return self.info.exit_code if self.run is not None else ExitCode.OK

    def training_epoch(self) -> int | None:
        """The epoch being trained (1-based, as train.log's `Epoch N/M`), while the run trains."""
        run = self.info
        done = run.epoch or 0
        if self.state != layout.RUNNING or run.phase != "training" or run.epochs is None or done >= run.epochs:
            return None
        return done + 1

    def eta_seconds(self) -> float | None:
        epoch, epochs = self.info.epoch or 0, self.info.epochs
        seconds = [h.seconds for h in self.history[-10:] if h.seconds is not None]
        if not epochs or not seconds or self.final:
            return None
        return statistics.median(seconds) * (epochs - epoch)

    def to_json(self) -> dict[str, Any]:
        run, last = self.info, self.history[-1] if self.history else None
        return {
            # epoch: epochs finished (committed); training_epoch: the one under way, numbered as
            # train.log's "Epoch N/M" lines number it (None once the run has ended)
            "run_id": self.run_id, "state": self.state, "epoch": run.epoch, "epochs": run.epochs,
            "training_epoch": self.training_epoch(),
            "val_accuracy": last.val_accuracy if last else None, "best_val_accuracy": run.best_val_accuracy,
            "best_epoch": run.best_epoch, "alive": self.alive, "error": run.error, "stall": run.stall,
            "quiet_for": run.quiet_for, "eta_seconds": self.eta_seconds(),
            "mirror": asdict(run.mirror) if run.mirror else None,
            "recoveries": [asdict(r) for r in run.recoveries], "lost_seconds": run.lost_seconds,
            "interruption": asdict(run.interruption) if run.interruption else None, "rebalance_at": self.rebalance_at,
            "gpus": [asdict(g) for g in self.host.gpus], "load": asdict(self.host.load), "log_tail": self.log_tail,
        }

    def summary(self) -> str:
        run = self.info
        best_text = f"best val_accuracy {run.best_val_accuracy:.4f} ({best_epoch_text(run.best_epoch)})" \
            if run.best_val_accuracy is not None else "no best checkpoint"
        after = f" after {recovered(run)}" if run.recoveries else ""
        text = f"run {self.run_id} {self.state}{after} at epoch {run.epoch}/{run.epochs}: {best_text}"
        if self.state == layout.FAILED and run.error:
            text += f"; error: {run.error}"
        versus = compared_with_parent(run, long=True)
        if versus:
            text += f"; {versus}"
        if self.state == layout.INTERRUPTED and run.interruption is not None:
            text += f"; {run.interruption.describe()}: `orch resume {self.run_id} --continue` continues it"
        if self.state == DIED:
            text += "; the process is gone without a final state (killed? out of memory? never started?): " \
                    f"`orch resume {self.run_id} --continue` picks it up from its last epoch"
        if run.mirror is not None:
            text += f"; storage: {run.mirror.describe()}"
        if self.rebalance_at:
            text += f"; {rebalance_text(self.rebalance_at)}"
        if self.state in (DIED, layout.FAILED) and self.log_tail:
            text += " | last lines of train.log: " + " | ".join(line for line in self.log_tail[-3:] if line.strip())
        return text

    def recoveries_line(self) -> str:
        """'recovered 2 times, 3 min lost (last: 2026-11-21 10:30:15, spot interruption)'."""
        last = self.info.recoveries[-1]
        return f"{recovered(self.info, noun=False)} (last: {last.at[:19].replace('T', ' ')}, {last.why})"

    def process_text(self) -> str:
        """What the process is doing; once the run has a final state it is never called alive
        (it only has its exit left to do)."""
        if self.state in layout.FINAL_STATES:
            return "process exiting" if self.alive else "process ended"
        if self.run is not None and self.run.signal_stopped:
            return "process stopped by a signal"
        return "process alive" if self.alive else "process not running"

    def render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        run = self.info
        epoch, epochs = run.epoch or 0, run.epochs or 0
        color = {layout.FINISHED: "green", layout.FAILED: "red", DIED: "red", STALLED: "red",
                 layout.STOPPED: "yellow", layout.INTERRUPTED: "yellow"}.get(
            self.state or "", "cyan")
        head = Text.assemble(("run ", "bold"), (clean(self.run_id), "bold"), "  ",
                             (clean(str(self.state)), f"bold {color}"), "  " + self.process_text(),
                             f"  ({clean(self.note)})" if self.note else "")
        eta = self.eta_seconds()
        bar = Table.grid(padding=(0, 1))
        training = self.training_epoch()
        label = f"epoch {training}/{epochs} ({epoch} done)" if training is not None else f"epoch {epoch}/{epochs}"
        bar.add_row(label, ProgressBar(total=max(epochs, 1), completed=epoch, width=40),
                    f"ETA {_duration(eta)}" if eta is not None else "")
        last = self.history[-1] if self.history else Epoch(0)
        acc = Table.grid(padding=(0, 2))
        best = run.best_val_accuracy
        acc.add_row("val_accuracy", _fmt(last.val_accuracy),
                    "best", f"{_fmt(best)} ({best_epoch_text(run.best_epoch)})" if best is not None else "-")
        acc.add_row("val_acc trend", sparkline(_series(self.history, "val_accuracy")), "", "")
        acc.add_row("loss trend", sparkline(_series(self.history, "loss")), "last", _fmt(last.loss))
        parts: list[Any] = [head, bar, acc, self._machine_table()]
        if run.error:
            parts.append(Text(clean(f"error: {run.error}"), style="red"))
        if run.stall:
            parts.append(Text(f"stalled: {run.stall}", style="red"))
        if run.recoveries:
            parts.append(Text(clean(self.recoveries_line())))
        if self.state == layout.INTERRUPTED and run.interruption is not None:
            parts.append(Text(clean(run.interruption.describe()), style="yellow"))
        if self.rebalance_at:
            parts.append(Text(clean(rebalance_text(self.rebalance_at)), style="yellow"))
        if run.mirror is not None:
            parts.append(Text(clean(f"storage: {run.mirror.describe()}"),
                              style="yellow" if run.mirror.state == "retrying" else ""))
        parts.append(Text("\n".join(clean(line) for line in self.log_tail[-LOG_LINES:]), style="dim"))
        return Group(*parts)

    def _machine_table(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        if not self.host.gpus:
            return Text(clean(describe_load(self.host)))
        table = Table("GPU", "name", "util %", "memory MiB", "temp °C", "power W", box=None)
        for g in self.host.gpus:
            memory = f"{_fmt(g.memory_used, 0)}/{_fmt(g.memory_total, 0)}"
            table.add_row(str(g.index), clean(g.name), _fmt(g.utilization, 0), memory, _fmt(g.temperature, 0),
                          _fmt(g.power, 1))
        return table


def rebalance_text(since: str) -> str:
    return (f"EC2 recommends rebalancing since {since[:40]}: this spot instance is at higher risk of "
            "interruption")


def _series(history: list[Epoch], name: str) -> list[float]:
    return [v for v in (getattr(h, name) for h in history) if v is not None]


def describe_load(host: Host) -> str:
    """'no GPU (why); CPU load 0.5 on 2 cores, memory 3000/8000 MiB'."""
    load = host.load
    mem = (f", memory {load.mem_total_mb - load.mem_available_mb}/{load.mem_total_mb} MiB"
           if load.mem_total_mb is not None and load.mem_available_mb is not None else "")
    avg = load.loadavg[0] if load.loadavg else "?"
    return (f"no GPU ({host.gpu_error or 'nvidia-smi found none'}); CPU load {avg} on "
            f"{load.cpus if load.cpus is not None else '?'} cores{mem}")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def monitor(ctx: Context, run_id: str | None, *, interval: float = 5.0, once: bool = False,
            show: Callable[[RunView], None] | None = None, max_backoff: float = 30.0) -> RunView:
    """Follow a run until it ends (or one snapshot with ``once``). ``show`` draws each refresh.
    A dropped connection is retried with backoff; the run itself is never touched."""
    view: RunView | None = None
    backoff = 1.0
    while True:
        try:
            with acquire(ctx) as m:
                if view is None:
                    view = RunView(m.choose(run_id).run_id)
                with m.snapshots(view.run_id, idle=max(IDLE, 3 * interval)) as feed:
                    backoff = 1.0
                    _follow(view, feed, interval, once, show)
                    return view
        except ConnectError as exc:
            if view is None and not isinstance(exc, ConnectionLost):
                raise  # cannot connect at all (wrong host, key, port): say so at once
            note = f"connection lost ({exc}); reconnecting in {backoff:.0f} s"
            ctx.log(note)
            if view is not None:
                view.note = note
                if show is not None:
                    show(view)
            time.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)


def _follow(view: RunView, feed: Snapshots, interval: float, once: bool, show: Callable[[RunView], None] | None
            ) -> None:
    """Refresh ``view`` from ``feed`` until the run ends (or once)."""
    exiting = 0
    while True:
        view.update(feed.get(len(view.history), LOG_LINES))
        # A final state is written just before the process exits: wait for the exit (briefly)
        # so the last frame shows the process ended.
        if view.final and view.alive and not once and exiting < EXIT_WAIT_REFRESHES:
            exiting += 1
            time.sleep(0.2)
            continue
        if show is not None:
            show(view)
        if once or view.final:
            return
        time.sleep(interval)
