"""Training speed of the defaults on whatever device and Keras backend are installed.

Per dtype policy (float32, mixed_bfloat16, mixed_float16: how mixed precision's choice per
device class in trainer/ml/precision.py is checked), on an in-memory random data set:

- samples/s of ``fit`` as ``trainer train`` runs it (its batch pipeline and worker threads, the
  model with every default: in-graph augmentation, EMA, class weights; validation included),
- the GPU's utilization while it trains (``nvidia-smi -lms``, the mean over epochs 2..),
- the host pipeline's samples/s (one thread) against the model step's (batches made beforehand).

    KERAS_BACKEND=jax python bench/bench_gpu.py [--n 8000] [--dim 768] [--frames 50 300] [--epochs 4]
    python bench/bench_gpu.py --quick      # seconds, on a CPU too: prints the figures, says there is no GPU

It imports no TensorFlow itself and neither does the trainer code it runs (a GPU machine may
have only JAX or PyTorch under Keras). Where Keras is not installed, carry its wheels (keras,
absl-py, namex, optree, ml-dtypes, h5py, rich, markdown-it-py, mdurl, pygments, packaging)
and put them on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.contract.labels import parse_classes  # noqa: E402
from trainer.contract.options import default  # noqa: E402
from trainer.ml.dataset import Dataset, Sample, ScanInfo  # noqa: E402
from trainer.ml.stats import Stats  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def random_dataset(n: int, dim: int, frames: tuple[int, int], seed: int = 0) -> Dataset:
    """``n`` sequences of random float16 frames (lengths uniform in ``frames``), random labels."""
    rng = np.random.default_rng(seed)
    classes = parse_classes(default("classes"))
    lengths = rng.integers(frames[0], frames[1] + 1, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    data = rng.standard_normal((int(lengths.sum()), dim), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, len(classes), n)
    samples = [Sample(f"random-{i}", classes[labels[i]], "random", None, int(o), int(t))
               for i, (o, t) in enumerate(zip(offsets, lengths, strict=True))]
    return Dataset(Path("random"), classes, (dim,), samples, [], data, ScanInfo())


class GpuSampler:
    """The first GPU's utilization.gpu (%) every 250 ms, timestamped, from one ``nvidia-smi -lms``."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu",
                                           "--format=csv,noheader,nounits", "-lms", "250"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip()[:16])))
            except ValueError:
                continue  # [N/A], [Not Supported]

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def mean(self, start: float, end: float) -> float | None:
        values = [v for t, v in self.samples if start <= t <= end]
        return float(np.mean(values)) if values else None


@dataclass
class Result:
    policy: str
    epoch_seconds: float
    samples_per_s: float
    gpu_utilization: float | None
    step_samples_per_s: float
    pipeline_samples_per_s: float
    epochs: list[float] = field(default_factory=list)


def measure(policy: str, ds: Dataset, epochs: int, step_epochs: int) -> Result:
    """One policy: the trainer's fit with every default, then its step and its pipeline alone."""
    import keras

    from bench.speed import EpochClock, pipeline_rate, step_rate, trainer_model, training_sequence
    from trainer.ml.config import TrainConfig
    from trainer.ml.pipeline import BatchSequence

    keras.mixed_precision.set_global_policy(policy)
    train, val = np.arange(len(ds))[len(ds) // 10:], np.arange(len(ds))[: len(ds) // 10]
    cfg = TrainConfig(data_dir="random", run_dir="none", epochs=epochs, classes=ds.classes)
    seq = training_sequence(ds, train, cfg)
    model = trainer_model(cfg, Stats(np.zeros(ds.feature_shape, np.float32), np.ones(ds.feature_shape, np.float32)),
                          len(ds.classes), len(seq))
    starts: list[float] = []

    class Marks(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            starts.append(time.perf_counter())

    clock = EpochClock()
    with GpuSampler() as gpu:
        model.fit(seq, validation_data=BatchSequence(ds, val, cfg.batch_size, shuffle=False), epochs=epochs,
                  verbose=0, shuffle=False, callbacks=[Marks(), clock])
        end = time.perf_counter()
    utilization = gpu.mean(starts[1], end) if len(starts) > 1 else gpu.mean(starts[0], end)
    seconds = clock.median()
    step = step_rate(model, seq, step_epochs)
    keras.mixed_precision.set_global_policy("float32")
    return Result(policy, seconds, len(train) / seconds, utilization, step, pipeline_rate(seq),
                  [round(t, 3) for t in clock.times])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, float32 only: checks that the bench runs")
    ap.add_argument("--n", type=int, default=8000, help="sequences (a tenth validates)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--frames", type=int, nargs=2, default=(50, 300), metavar=("MIN", "MAX"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--policies", default=None, help=f"comma-separated subset of {','.join(POLICIES)}")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.n, args.dim, args.frames, args.epochs = 160, 16, (8, 40), 2
    policies = tuple(args.policies.split(",")) if args.policies else (POLICIES[:1] if args.quick else POLICIES)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        sys.exit(f"--policies: unknown {', '.join(sorted(unknown))} (known: {', '.join(POLICIES)})")
    import keras

    from trainer.ml import precision

    device = precision.training_device()
    print(f"device: {device.describe()}" + ("" if device.kind == "gpu" else " (no GPU: these are CPU figures)")
          + f"; Keras {keras.__version__} on {keras.backend.backend()}")
    ds = random_dataset(args.n, args.dim, tuple(args.frames))
    print(f"data: {args.n} random sequences of {args.frames[0]}-{args.frames[1]} frames x {args.dim} "
          f"(float16), batch {default('batch_size')}, every trainer default on")
    results = [measure(p, ds, args.epochs, 2 if args.quick else 3) for p in policies]
    header = f"  {'policy':15s} {'epoch s':>8s} {'samples/s':>10s} {'GPU util %':>10s} " \
             f"{'step samples/s':>15s} {'pipeline samples/s':>19s} {'pipeline/step':>14s}"
    print(header + "\n  " + "-" * (len(header) - 2))
    for r in results:
        util = "n/a" if r.gpu_utilization is None else f"{r.gpu_utilization:.0f}"
        print(f"  {r.policy:15s} {r.epoch_seconds:8.2f} {r.samples_per_s:10.0f} {util:>10s} "
              f"{r.step_samples_per_s:15.0f} {r.pipeline_samples_per_s:19.0f} "
              f"{r.pipeline_samples_per_s / r.step_samples_per_s:14.1f}")
    chosen = precision.choose(None, device)
    print(f"the trainer's choice here (--mixed-precision unset): {chosen.policy} ({chosen.reason})")
    if args.json:
        args.json.write_text(json.dumps({"device": device.describe(), "backend": keras.backend.backend(),
                                         "results": [r.__dict__ for r in results], "chosen": chosen.to_json()},
                                        indent=2))


if __name__ == "__main__":
    main()
