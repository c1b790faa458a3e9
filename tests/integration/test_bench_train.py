"""bench/bench_train.py --quick runs every section end to end (so the benchmark cannot rot);
its numbers are not asserted: a few seconds of training on a tiny SYNTHETIC set mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.trainer_proc import ROOT, trainer_env

pytestmark = pytest.mark.slow


def test_quick_bench_prints_every_table(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=trainer_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("SYNTHETIC data")
    for heading in ("1. held-out speakers", "2. ablation", "3. layer selection", "4. extended runs",
                    "5. time per epoch"):
        assert heading in text
    for row in ("ours: trainer train + predict", "logistic regression", "MLP", "per-speaker normalized", "defaults",
                "before issue 11", "seed recipe", "plain average", "--layers auto"):
        assert row in text
    assert "held-out speakers, synth set" in text and "held-out speakers, independent set" in text
    results = json.loads(out.read_text())
    assert set(results["heldout"]) == {"synth", "independent"}
    for data_set in results["heldout"].values():
        for model, scores in data_set.items():
            for s in scores:
                assert set(s) == {"accuracy", "unweighted_accuracy", "macro_f1"}, model
                assert all(0.0 <= v <= 1.0 for v in s.values())
    assert results["timing"]["in_memory_fit_s"] > 0 and results["timing"]["peak_rss_mb"] > 0
