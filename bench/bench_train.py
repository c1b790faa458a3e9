"""Training benchmarks on SYNTHETIC data (speaker split), each against a named baseline
measured in the same run:

1. accuracy: `trainer train` vs logistic regression on mean-pooled normalized features
   (scikit-learn, same split, same training-split statistics);
2. input-pipeline overhead: median time per epoch of `trainer train` vs `model.fit` of the
   same model on the same arrays already in memory as one padded tensor (target <= 1.1);
3. memory: peak RSS of the training process vs the size of the dataset arrays, with the peak
   RSS of the same run on a tiny dataset as the fixed baseline (TensorFlow itself).

    python bench/bench_train.py [--n 2000] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import layout  # noqa: E402
from trainer.config import Architecture  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.split import load_split  # noqa: E402
from trainer.stats import load_stats  # noqa: E402
from trainer.synth import synth  # noqa: E402


def run_trainer(args: list[str], log: Path) -> tuple[int, float]:
    """Run `python -m trainer ...`; returns (exit code, peak RSS in MB of that process)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def logistic_regression_accuracy(ds, split, stats) -> float:
    from sklearn.linear_model import LogisticRegression

    pooled = np.stack([stats.normalize(ds.sequence(i)).mean(axis=0) for i in range(len(ds))])
    y = ds.label_ids()
    clf = LogisticRegression(max_iter=3000, C=0.1).fit(pooled[split.train], y[split.train])
    return float(clf.score(pooled[split.val], y[split.val]))


def in_memory_fit_seconds(ds, split, stats, arch: Architecture, batch: int, epochs: int) -> float:
    """Median epoch time of model.fit on one padded in-memory tensor (the baseline)."""
    import keras

    from trainer.model import build_model
    from trainer.pipeline import pad_batch

    def tensors(idx):
        x = pad_batch([ds.sequence(int(i)) for i in idx], stats)
        return x, np.eye(len(ds.classes), dtype=np.float32)[ds.label_ids()[idx]]

    x_train, y_train = tensors(split.train)
    x_val, y_val = tensors(split.val)
    model = build_model(arch, ds.feature_shape, len(ds.classes))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, global_clipnorm=1.0),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x_train, y_train, validation_data=(x_val, y_val), batch_size=batch, epochs=epochs,
              shuffle=True, verbose=0, callbacks=[Clock()])
    return float(np.median(times[1:]))  # epoch 1 includes tracing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="orch-bench-train-"))
    data, tiny, run, tiny_run = work / "data", work / "tiny", work / "run", work / "tiny-run"
    synth(data, n=args.n, seed=0)
    synth(tiny, n=60, seed=0)
    common = ["--split", "speaker", "--val-fraction", "0.2", "--batch-size", str(args.batch_size),
              "--cache-dir", str(work / "cache")]

    code, peak = run_trainer(["train", "--data-dir", str(data), "--run-dir", str(run), "--epochs",
                              str(args.epochs), *common], work / "train.log")
    if code != 0:
        sys.exit(f"trainer failed ({code}); see {work / 'train.log'}")
    _, tiny_peak = run_trainer(["train", "--data-dir", str(tiny), "--run-dir", str(tiny_run),
                                "--epochs", "2", *common], work / "tiny.log")

    ds = load_dataset(data, cache_dir=work / "cache")
    split, _ = load_split(run / layout.stats_path(layout.SPLIT_JSON), ds)
    stats = load_stats(run / layout.STATS_DIR, ds.feature_shape)
    status = json.loads((run / layout.STATUS).read_text())
    report = json.loads((run / layout.stats_path(layout.EVALUATION_JSON)).read_text())
    rows = [json.loads(line) for line in (run / layout.METRICS).read_text().splitlines()]
    lr_acc = logistic_regression_accuracy(ds, split, stats)
    ours = float(np.median([r["seconds"] for r in rows[1:]]))
    baseline = in_memory_fit_seconds(ds, split, stats, Architecture(), args.batch_size, epochs=6)
    data_mb = ds.frames.nbytes / 1e6
    raw_mb = sum(p.stat().st_size for p in data.iterdir()) / 1e6

    print(f"SYNTHETIC data: {len(ds)} samples ({raw_mb:.0f} MB of files, {data_mb:.0f} MB as float16), "
          f"speaker split {len(split.train)} train / {len(split.val)} validation, {args.epochs} epochs")
    print("1. accuracy on unseen speakers (validation)")
    print(f"   baseline: logistic regression, mean-pooled normalized features  {lr_acc:.3f}")
    print(f"   trainer train (best checkpoint)                                 {status['best_val_accuracy']:.3f}"
          f"   (unweighted accuracy {report['unweighted_accuracy']:.3f}, macro F1 {report['macro_f1']:.3f})")
    print(f"   difference {status['best_val_accuracy'] - lr_acc:+.3f}")
    print("2. time per epoch (median of epochs 2..)")
    print(f"   baseline: model.fit on one padded in-memory tensor   {baseline:6.2f} s")
    print(f"   trainer train (checkpoints, metrics, TensorBoard)    {ours:6.2f} s   ratio {ours / baseline:.2f} (target <= 1.1)")
    print("3. memory")
    print(f"   peak RSS, training run                               {peak:7.0f} MB")
    print(f"   baseline: peak RSS, same run on 60 files             {tiny_peak:7.0f} MB")
    print(f"   dataset arrays (float16)                             {data_mb:7.0f} MB")
    print(f"   (peak - baseline) / dataset arrays                   {(peak - tiny_peak) / data_mb:7.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
