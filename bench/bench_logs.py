"""`orch logs` of a large train.log against OpenSSH `cat` of the same file over the same
settings, in the same run, over a loopback sshd: its speed (target >= 50 MB/s, ratio printed)
and its memory (peak RSS of `orch logs` for the large log against the same for a 1 KB log:
flat memory means a ratio near 1).

    python bench/bench_logs.py [--mb 500] [--quick]

--quick: 20 MB, one repetition (CI runs it so the script cannot rot; no target applies).
"""

from __future__ import annotations

import argparse
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

import yaml  # noqa: E402

from orchestrator.context import Context  # noqa: E402
from orchestrator.provision import acquire  # noqa: E402
from tests.servers import peak_rss, ssh_deploy_config, start_sshd  # noqa: E402
from trainer.contract import layout  # noqa: E402

REPEATS = 3


def fake_run(run_dir: Path, mb: int) -> None:
    """A finished run whose train.log is ``mb`` MB of Keras-like lines."""
    run_dir.mkdir(parents=True)
    (run_dir / layout.STATUS).write_text('{"state": "finished"}')
    line = b"41/41 - 3s - 69ms/step - accuracy: 0.7487 - loss: 0.6779 - val_accuracy: 0.6196 - lr: 0.00099\n"
    block = line * ((1 << 20) // len(line) + 1)
    with open(run_dir / layout.TRAIN_LOG, "wb") as fh:
        for _ in range(mb):
            fh.write(block[: 1 << 20])


def orch_logs(cfg: Path, run_id: str) -> tuple[float, int]:
    """(seconds, peak RSS in KB) of `orch logs RUN > /dev/null` as a real process."""
    start = time.perf_counter()
    code, rss, err = peak_rss([sys.executable, "-m", "orchestrator", "logs", run_id, "-c", str(cfg)],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if code != 0:
        raise SystemExit(f"orch logs failed: {err}")
    return time.perf_counter() - start, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="20 MB, one repetition: checks that it runs")
    args = ap.parse_args()
    repeats = 1 if args.quick else REPEATS
    if args.quick:
        args.mb = 20
    work = Path(tempfile.mkdtemp(prefix="orch-bench-logs-"))
    runs = work / "remote" / layout.RUNS_DIR
    fake_run(runs / "big", args.mb)
    fake_run(runs / "small", 0)
    (runs / "small" / layout.TRAIN_LOG).write_bytes(b"x" * 1000 + b"\n")
    with start_sshd(work / "sshd") as sshd:
        cfg_obj = ssh_deploy_config(sshd, work)
        cfg = work / "deploy.yaml"
        cfg.write_text(yaml.safe_dump(cfg_obj.model_dump(mode="json")))  # type: ignore[attr-defined]
        with acquire(Context(cfg_obj)) as m:  # type: ignore[arg-type]
            ssh = m.remote.openssh_argv()  # type: ignore[attr-defined]
            log = str(runs / "big" / layout.TRAIN_LOG)
            cat, ours, rss = [], [], []
            for _ in range(repeats):  # alternate the two
                start = time.perf_counter()
                with open(os.devnull, "wb") as devnull:
                    subprocess.run([*ssh, f"cat -- {log}"], stdout=devnull, check=True)
                cat.append(time.perf_counter() - start)
                seconds, peak = orch_logs(cfg, "big")
                ours.append(seconds)
                rss.append(peak)
            _, small_rss = orch_logs(cfg, "small")
    base, mine = statistics.median(cat), statistics.median(ours)
    print(f"{args.mb} MB train.log over OpenSSH sshd on 127.0.0.1 (median of {repeats})")
    print(f"  baseline: ssh host cat (the same settings) {base:6.2f} s  {args.mb / base:6.0f} MB/s")
    print(f"  orch logs (framed, cleaned)              {mine:6.2f} s  {args.mb / mine:6.0f} MB/s   ratio "
          f"{mine / base:.2f} (target: >= 50 MB/s)")
    print(f"  peak RSS of orch logs: {max(rss) / 1024:.0f} MB for {args.mb} MB, {small_rss / 1024:.0f} MB for 1 KB"
          f"   ratio {max(rss) / small_rss:.2f} (flat memory: ~1)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
