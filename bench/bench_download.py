"""`orch download` of a 500 MB checkpoint against OpenSSH `scp` of the same file, in the same
run, over a loopback sshd (target ratio <= 1.0); and the time of one monitor refresh over an
open connection against a bare `true` round trip on the same connection.

    python bench/bench_download.py [--mb 500] [--quick]

--quick: 5 MB, one repetition (CI runs it so the script cannot rot; no target applies).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.context import Context  # noqa: E402
from orchestrator.download import download  # noqa: E402
from orchestrator.provision import acquire  # noqa: E402
from tests.servers import ssh_deploy_config, start_sshd  # noqa: E402
from trainer.contract import layout  # noqa: E402

REPEATS = 5  # the machine is shared and noisy: medians of five, and each pair's ratio


def fake_run(run_dir: Path, mb: int) -> None:
    """A finished run whose best checkpoint is ``mb`` MB of random bytes."""
    best = run_dir / layout.BEST_WEIGHTS
    best.parent.mkdir(parents=True)
    h = hashlib.sha256()
    with open(best, "wb") as fh:
        for _ in range(mb):
            block = os.urandom(1 << 20)
            fh.write(block)
            h.update(block)
    (run_dir / layout.STATUS).write_text(json.dumps({"state": "finished", "best_val_accuracy": 0.5, "epoch": 1,
                                                     "epochs": 1}))
    (run_dir / layout.METRICS).write_text(json.dumps({"epoch": 1, "val_accuracy": 0.5, "seconds": 1.0}) + "\n")
    (run_dir / layout.MANIFEST).write_text(layout.manifest_line(h.hexdigest(), layout.BEST_WEIGHTS) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: checks that it runs")
    args = ap.parse_args()
    repeats, refreshes = (1, 3) if args.quick else (REPEATS, 20)
    if args.quick:
        args.mb = 5
    work = Path(tempfile.mkdtemp(prefix="orch-bench-download-"))
    fake_run(work / "remote" / layout.RUNS_DIR / "big", args.mb)
    src = work / "remote" / layout.RUNS_DIR / "big" / layout.BEST_WEIGHTS
    scp, ours = [], []
    with start_sshd(work / "sshd") as sshd:
        cfg = ssh_deploy_config(sshd, work)
        ssh_opts = ["-P", str(sshd.port), "-i", str(sshd.client_key), "-o", "BatchMode=yes",
                    "-o", f"UserKnownHostsFile={work / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes"]
        user = os.environ.get("USER") or "root"
        subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # page cache warm for both
        for rep in range(repeats):  # alternate, fresh destinations (deleting 500 MB slows the disk)
            start = time.perf_counter()
            subprocess.run(["scp", "-q", *ssh_opts, f"{user}@127.0.0.1:{src}", str(work / f"scp-{rep}.h5")], check=True)
            scp.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = download(Context(cfg), "big", dest=work / f"ours-{rep}")
            ours.append(time.perf_counter() - start)
            assert got.fetched == [layout.BEST_WEIGHTS]
        with acquire(Context(cfg)) as m:
            m.snapshot("big", 0, 10)  # first use opens what needs opening
            refresh, floor = [], []
            for _ in range(refreshes):
                start = time.perf_counter()
                m.snapshot("big", 0, 10)
                refresh.append(time.perf_counter() - start)
                start = time.perf_counter()
                m.remote.run("true")
                floor.append(time.perf_counter() - start)
    base, mine = statistics.median(scp), statistics.median(ours)
    pairs = " ".join(f"{o / b:.2f}" for o, b in zip(ours, scp, strict=True))
    print(f"{args.mb} MB checkpoint over OpenSSH sshd on 127.0.0.1 (median of {repeats})")
    print(f"  baseline: scp                          {base:6.2f} s  {args.mb / base:6.0f} MB/s")
    print(f"  orch download (verified, atomic)       {mine:6.2f} s  {args.mb / mine:6.0f} MB/s   ratio {mine / base:.2f} "
          f"(target <= 1.0; each pair: {pairs})")
    print(f"one monitor refresh over an open connection (median of {refreshes})")
    print(f"  baseline: `true` on the same connection {statistics.median(floor) * 1000:6.1f} ms")
    print(f"  monitor snapshot (one remote command)   {statistics.median(refresh) * 1000:6.1f} ms")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
