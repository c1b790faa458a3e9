"""Fault injection at scale: SIGKILL the trainer hundreds of times (at every failpoint of the
commit sequence and the repair, at various epochs, and at random moments), restarting the same
command each time, and check the run directory's guarantees after every kill and at the end of
every run (tests/integration/fault_harness.py, the harness the test suite runs with a few kills).

Prints "N kills, V violations"; exits 1 when V > 0. TensorFlow's start-up (~5 s) is most of
every restart: 300 kills took 50 minutes on a busy 2-core machine.

    python bench/bench_faults.py [--kills 300] [--seed 0] [--epochs 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.fault_harness import Judge, Scenario, kill_loop, make_data, reference_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ORCH_TRAINER_CACHE", str(work / "cache"))
    try:
        start = time.monotonic()
        scenario = Scenario(make_data(work / "data"), epochs=args.epochs)
        reference = reference_run(scenario, work / "reference")
        (work / "scratch").mkdir(exist_ok=True)
        judge = Judge(scenario, reference, work / "scratch")
        problems = judge.at_end(work / "reference")
        assert not problems, problems  # the checks pass on an uninterrupted run
        tally = kill_loop(scenario, reference, judge, work / "runs", kills=args.kills, seed=args.seed,
                          log=lambda line: print(line, flush=True))
        for violation in tally.violations:
            print(f"VIOLATION {violation}")
        print(f"{tally.detail()}; {time.monotonic() - start:.0f} s (seed {args.seed})")
        print(tally.line())
        return 1 if tally.violations else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
