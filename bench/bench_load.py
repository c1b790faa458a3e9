"""Loading speed of the data layer on 8,690 small SYNTHETIC files (~50 KB each).

Prints, against a named baseline measured in the same run (a plain sequential `np.load` loop
over the same files, what the old scripts did, without any validation): `load_dataset` cold
with the default settings (cache on, cache folder empty: every file decoded, validated,
stored as float16 and written into the cache), cold without a cache, warm (cache hit), and
the whole `python -m trainer check-data` command cold and cached. Each figure is the median of
--rounds rounds, the measurements of a round interleaved so a busy machine slows them alike;
ratios are given for wall time and for CPU time (user + system of this process and the
commands it runs), which a shared machine disturbs less; worker processes (children of multiprocessing's fork server, not
of this process) are not in it, so where the default is more than one worker read the wall
ratio. Also the peak RSS of a cold load, per byte
of the frame array it builds (1.0: memory holds the data once).

    python bench/bench_load.py [--n 8690] [--rounds 5] [--dir /tmp/orch-bench-load] [--quick]

--quick: 300 files, one round (CI runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.ml.arrays import default_workers  # noqa: E402
from trainer.ml.data import load_dataset  # noqa: E402
from trainer.ml.synth import synth  # noqa: E402

TARGET = 1.2  # issue 19: a cold load_dataset costs at most 1.2x the bare np.load loop

# Peak RSS of one cold load in a fresh interpreter, above its resident memory before (Linux).
_RSS_PROBE = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
from trainer.ml.data import load_dataset
with open("/proc/self/statm") as fh:
    before = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
ds = load_dataset(sys.argv[2], cache_dir=sys.argv[3])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_bytes": peak - before, "frames_bytes": ds.frames.nbytes}))
"""


def cpu_seconds() -> float:
    t = os.times()  # children: the check-data commands (pool workers are the fork server's)
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


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


def cold(data: Path, cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)
    ds = load_dataset(data, cache_dir=cache)
    assert ds.cache == "miss", ds.cache


def warm(data: Path, cache: Path) -> None:
    ds = load_dataset(data, cache_dir=cache)
    assert ds.cache == "hit", ds.cache


def peak_rss_per_frame_byte(data: Path, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(ROOT), str(data), str(cache)],
                         check=True, capture_output=True, text=True)
    probe = json.loads(out.stdout)
    return probe["peak_bytes"] / probe["frames_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8690)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 300, 1
    work = args.dir or Path(tempfile.mkdtemp(prefix="orch-bench-load-"))
    data, cache, cli_cache = work / "data", work / "cache", work / "cli-cache"
    shutil.rmtree(work, ignore_errors=True)
    # T in 8..24 frames of 768 float32 values: ~50 KB per file on average.
    synth(data, n=args.n, seed=0, dim=768, min_frames=8, max_frames=24)
    size_mb = sum(p.stat().st_size for p in data.iterdir()) / 1e6
    n_files = baseline_sequential(data)  # also warms the page cache: every measurement reads from memory
    workers = default_workers(n_files)
    print(f"{n_files} SYNTHETIC feature files, {size_mb:.0f} MB, in {data}; {os.cpu_count()} cores, "
          f"default {workers} worker(s); median of {args.rounds} round(s)")

    cli = [sys.executable, "-m", "trainer", "check-data", str(data), "--json", "--cache-dir", str(cli_cache)]
    rows: dict[str, Callable[[], object]] = {
        "baseline: sequential np.load, no validation": lambda: baseline_sequential(data),
        "load_dataset, cold, default settings (cache empty)": lambda: cold(data, cache),
        "load_dataset, cold, no cache": lambda: load_dataset(data, use_cache=False),
        "load_dataset, cached (warm)": lambda: warm(data, cache),
        "python -m trainer check-data, cold": lambda: (shutil.rmtree(cli_cache, ignore_errors=True),
                                                       subprocess.run(cli, check=True, capture_output=True)),
        "python -m trainer check-data, cached": lambda: subprocess.run(cli, check=True, capture_output=True),
    }
    if workers > 1:
        rows["load_dataset, cold, no cache, in-process (1 worker)"] = \
            lambda: load_dataset(data, use_cache=False, workers=1)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            runs[name].append(timed(fn))
    wall = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
    cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items()}
    base = "baseline: sequential np.load, no validation"
    for name in rows:
        print(f"  {name:<52} {wall[name]:6.2f} s  {n_files / wall[name]:8.0f} files/s  ratio vs baseline: "
              f"wall {wall[name] / wall[base]:5.2f}, CPU {cpu[name] / cpu[base]:5.2f}")
    default = "load_dataset, cold, default settings (cache empty)"
    print(f"cold load_dataset (default settings) vs sequential np.load: wall ratio {wall[default] / wall[base]:.2f}, "
          f"CPU ratio {cpu[default] / cpu[base]:.2f} (target <= {TARGET}); warm cache: "
          f"{wall['load_dataset, cached (warm)']:.2f} s, ratio {wall['load_dataset, cached (warm)'] / wall[base]:.2f}")
    print(f"peak RSS of a cold load, per byte of its frame array: {peak_rss_per_frame_byte(data, cache):.2f}")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
