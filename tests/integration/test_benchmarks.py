"""Benchmarks cannot rot: each one runs in its quick mode (tiny sizes, no target asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.trainer_proc import trainer_env

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[2] / "bench"
# script -> (its quick arguments, a line its report must contain)
QUICK = {
    "bench_load.py": (["--quick"], "load_dataset, cached"),
    "bench_sync.py": (["--quick"], "orch sync"),
    "bench_download.py": (["--quick"], "monitor snapshot"),
    "bench_logs.py": (["--quick"], "orch logs (framed, cleaned)"),
    "bench_monitor.py": (["--quick"], "monitor refresh (ask -> parsed snapshot"),
    "bench_faults.py": (["--kills", "1", "--epochs", "2"], "kills, 0 violations"),
    "bench_gpu.py": (["--quick"], "the trainer's choice here"),  # on this CPU: no GPU figure
}


@pytest.mark.parametrize("script", sorted(QUICK))
def test_benchmark_runs_in_quick_mode(script: str) -> None:
    args, expected = QUICK[script]
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          env=trainer_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert expected in proc.stdout


def test_every_benchmark_has_a_quick_run() -> None:
    # bench_train.py --quick has its own test, which also reads its tables and JSON
    # (tests/integration/test_bench_train.py)
    assert {p.name for p in BENCH.glob("bench_*.py")} == set(QUICK) | {"bench_train.py"}
