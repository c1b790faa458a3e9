"""Loading speed of the data layer on 8,690 small SYNTHETIC files (~50 KB each).

Prints files/s for a cold load (every file decoded and validated), a cached load, and the
whole `python -m trainer check-data` command, against a named baseline measured in the same
run: a plain sequential `np.load` loop over the same files (what the old scripts did,
without any validation).

    python bench/bench_load.py [--n 8690] [--dir /tmp/orch-bench-load] [--quick]

--quick: 300 files (CI runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.ml.arrays import default_workers  # noqa: E402
from trainer.ml.data import load_dataset  # noqa: E402
from trainer.ml.synth import synth  # noqa: E402


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def baseline_sequential(root: Path) -> int:
    n = 0
    for path in sorted(root.iterdir()):
        if path.suffix == ".npz":
            with np.load(path) as z:
                _ = z[z.files[0]]
        elif path.suffix == ".npy":
            _ = np.load(path)
        else:
            continue
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8690)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.n = 300
    work = args.dir or Path(tempfile.mkdtemp(prefix="orch-bench-load-"))
    data, cache = work / "data", work / "cache"
    shutil.rmtree(work, ignore_errors=True)
    # T in 8..24 frames of 768 float32 values: ~50 KB per file on average.
    synth(data, n=args.n, seed=0, dim=768, min_frames=8, max_frames=24)
    size_mb = sum(p.stat().st_size for p in data.iterdir()) / 1e6
    print(f"{args.n} SYNTHETIC files, {size_mb:.0f} MB, in {data}")

    # Warm the page cache once so every measurement reads from memory alike.
    baseline_sequential(data)
    t_base, n_files = timed(lambda: baseline_sequential(data))
    t_serial, _ = timed(lambda: load_dataset(data, use_cache=False, workers=1))
    t_cold, ds = timed(lambda: load_dataset(data, cache_dir=cache))
    assert ds.cache == "miss"
    t_hit, ds2 = timed(lambda: load_dataset(data, cache_dir=cache))
    assert ds2.cache == "hit"
    shutil.rmtree(cache)
    cmd = [sys.executable, "-m", "trainer", "check-data", str(data), "--json", "--cache-dir", str(cache)]
    t_cli_cold, _ = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
    t_cli_hit, _ = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))

    def row(name: str, seconds: float) -> None:
        print(f"  {name:<46} {seconds:7.2f} s  {n_files / seconds:9.0f} files/s  "
              f"ratio vs baseline {seconds / t_base:5.2f}")

    print(f"usable samples: {len(ds)} (skipped {len(ds.skipped)}: RAVDESS surprise)")
    row("baseline: sequential np.load, no validation", t_base)
    row("load_dataset, cold, in-process", t_serial)
    row(f"load_dataset, cold, default ({default_workers(n_files)} worker(s))", t_cold)
    row("load_dataset, cached", t_hit)
    row("python -m trainer check-data, cold", t_cli_cold)
    row("python -m trainer check-data, cached", t_cli_hit)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
