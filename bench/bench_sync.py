"""Upload of 8,690 small files (~50 KB each) with `orch deploy --sync-data`'s sync, against
`tar c DIR | ssh host tar x` of the same folder, in the same run, over a loopback sshd.
Also the time of a second sync when nothing changed.

    python bench/bench_sync.py [--n 8690] [--quick]

--quick: 200 files, one repetition (CI runs it so the script cannot rot; no target applies).
"""

from __future__ import annotations

import argparse
import os
import shlex
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
from orchestrator.machine import Machine  # noqa: E402
from orchestrator.provision import acquire  # noqa: E402
from orchestrator.sync import sync_data  # noqa: E402
from tests.servers import ssh_deploy_config, start_sshd  # noqa: E402

REPEATS = 5  # the machine is shared and noisy: medians of five, and each pair's ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8690)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: checks that it runs")
    args = ap.parse_args()
    repeats = 1 if args.quick else REPEATS
    if args.quick:
        args.n = 200
    work = Path(tempfile.mkdtemp(prefix="orch-bench-sync-"))
    local = work / "features"
    local.mkdir()
    for i in range(args.n):
        (local / f"cremad_{1000 + i % 91}_TIE_HAP_XX_{i}.npy").write_bytes(os.urandom(48_000 + (i % 7) * 1000))
    size = sum(p.stat().st_size for p in local.iterdir()) / 1e6
    print(f"{args.n} files, {size:.0f} MB, over OpenSSH sshd on 127.0.0.1")
    baseline, first = [], []
    with start_sshd(work / "sshd") as sshd:
        cfg = ssh_deploy_config(sshd, work, local_dir=str(local), remote_dir="data")
        with acquire(Context(cfg)) as m:
            remote = m.remote
            ssh = shlex.join(remote.openssh_argv())
            # Alternate the two, each into a fresh folder: deleting 8,690 files right before a
            # measurement slows the next writes down for seconds on this disk.
            for rep in range(repeats):
                dest = work / f"baseline-{rep}"
                start = time.perf_counter()
                subprocess.run(f"tar -C {shlex.quote(str(local))} -cf - . | {ssh} "
                               f"'mkdir -p {dest} && tar -C {dest} -xf -'", shell=True, check=True)
                baseline.append(time.perf_counter() - start)
                cfg = ssh_deploy_config(sshd, work, local_dir=str(local), remote_dir=f"data-{rep}")
                # the same connection, another data folder
                start = time.perf_counter()
                result = sync_data(Machine(Context(cfg), remote))
                first.append(time.perf_counter() - start)
                assert result.files == args.n
            second = sync_data(Machine(Context(cfg), remote))
    assert second.files == 0
    base, ours = statistics.median(baseline), statistics.median(first)
    pairs = " ".join(f"{o / b:.2f}" for o, b in zip(first, baseline, strict=True))
    print(f"  baseline: tar c | ssh host tar x      {base:6.2f} s   (median of {repeats})")
    print(f"  orch sync ({result.method}), first upload    {ours:6.2f} s   ratio {ours / base:.2f} (target <= 1.0; "
          f"each pair: {pairs})")
    print(f"  orch sync, nothing changed            {second.seconds:6.2f} s   (target < 2 s)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
