"""One `orch monitor` refresh against a bare `true` round trip on the same connection, in the
same run, over a loopback sshd (target ratio <= 1.1).

What is compared, on ONE open SSH connection (paramiko, as orch uses it), interleaved:

- `true`: ``Remote.run("true")``, a command's round trip: a channel opened, `true` run by the
  login's shell, its exit status back. The least any command of its own costs per refresh.
- the monitor's refresh: ``Snapshots.get`` as ``orch monitor`` calls it, from asking for a
  snapshot to holding it parsed and checked (``wire.Snapshot``): a question line written to the
  long-lived ``snapshots`` command, which reads the run's files (and nvidia-smi, where there is
  one) and answers one framed record.
- before issue 19, for reference: ``Machine.snapshot``, the one-shot ``snapshot`` verb (a
  command of its own: the interpreter started, the machine side sent and imported each time).

The long-lived command's start (once per monitor session) is printed apart.

    python bench/bench_monitor.py [--refreshes 40] [--quick]

--quick: 3 refreshes (CI runs it so the script cannot rot; no target applies).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.context import Context  # noqa: E402
from orchestrator.monitor import LOG_LINES  # noqa: E402
from orchestrator.provision import acquire  # noqa: E402
from tests.servers import ssh_deploy_config, start_sshd  # noqa: E402
from trainer.contract import layout  # noqa: E402

EPOCHS = 20


def fake_run(run_dir: Path) -> None:
    """A finished run of EPOCHS epochs: status, metrics, a train.log of a few hundred lines."""
    run_dir.mkdir(parents=True)
    (run_dir / layout.STATUS).write_text(json.dumps({"state": "finished", "epoch": EPOCHS, "epochs": EPOCHS,
                                                     "best_val_accuracy": 0.6, "best_epoch": EPOCHS}))
    rows = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.6, "lr": 1e-3,
             "seconds": 3.0} for e in range(1, EPOCHS + 1)]
    (run_dir / layout.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = "41/41 - 3s - 69ms/step - accuracy: 0.7487 - loss: 0.6779 - val_accuracy: 0.6196 - lr: 0.00099\n"
    (run_dir / layout.TRAIN_LOG).write_text(line * 400)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refreshes", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="3 refreshes: checks that it runs")
    args = ap.parse_args()
    refreshes = 3 if args.quick else args.refreshes
    work = Path(tempfile.mkdtemp(prefix="orch-bench-monitor-"))
    fake_run(work / "remote" / layout.RUNS_DIR / "r1")
    floor, stream, oneshot, starts = [], [], [], []
    with start_sshd(work / "sshd") as sshd, acquire(Context(ssh_deploy_config(sshd, work))) as m:  # type: ignore[arg-type]
        m.remote.run("true")  # the first channel of a connection costs more: not counted
        for _ in range(max(3, refreshes // 10)):  # the long-lived command's start, once per monitor session
            with m.snapshots("r1") as feed:
                starts.append(timed(lambda: feed.get(0, LOG_LINES)))  # noqa: B023 (called at once)
        with m.snapshots("r1") as feed:
            feed.get(0, LOG_LINES)
            for i in range(refreshes):  # interleaved: the machine's noise falls on all three alike
                floor.append(timed(lambda: m.remote.run("true")))
                stream.append(timed(lambda: feed.get(EPOCHS, LOG_LINES)))  # noqa: B023 (as monitor asks: no new epoch)
                if i % 2 == 0:  # the old way is slow: half as often is enough for its median
                    oneshot.append(timed(lambda: m.snapshot("r1", EPOCHS, LOG_LINES)))
    base, mine, old = (statistics.median(x) * 1000 for x in (floor, stream, oneshot))
    print(f"one monitor refresh over an open connection, OpenSSH sshd on 127.0.0.1 (median of {refreshes})")
    print(f"  baseline: `true` on the same connection (a command's round trip) {base:7.1f} ms")
    print(f"  monitor refresh (ask -> parsed snapshot, one long-lived command) {mine:7.1f} ms   ratio "
          f"{mine / base:.2f} (target <= 1.1)")
    print(f"  before: one command per refresh (the `snapshot` verb)            {old:7.1f} ms   ratio {old / base:.2f}")
    print(f"  the long-lived command's start, once per monitor session       {statistics.median(starts) * 1000:7.1f} ms")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
