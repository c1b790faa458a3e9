"""The run directory: the one contract between ``orchestrator`` and ``trainer``.

Pure Python (no numpy, no TensorFlow): both halves import it, so every file name is written
down here exactly once.

    <remote_root>/runs/<run_id>/
      run.json  deploy.json  pid  train.log  metrics.jsonl  status.json  MANIFEST.sha256
      checkpoints/best.weights.h5  checkpoints/last.weights.h5  checkpoints/last.state.json
      stats/wav2vec_mean.npy  wav2vec_std.npy  classes.json  split.json
            evaluation.json  training_curves.png  confusion_matrix.png
      tensorboard/
"""

from __future__ import annotations

from pathlib import PurePosixPath

RUNS_DIR = "runs"
CODE_DIR = "code"
# Held (flock) by orch's busy check + launch on the machine: one launch at a time.
LAUNCH_LOCK = "launch.lock"
# Autostop (trainer/watcher.py), under remote.root: the setting, what the watcher last saw,
# its decisions, and the lock the one running watcher holds.
AUTOSTOP_SETTING = "autostop.json"
WATCHER_STATE = "watcher.json"
WATCHER_LOG = "watcher.log"
WATCHER_LOCK = "watcher.lock"

RUN_JSON = "run.json"
DEPLOY_JSON = "deploy.json"  # the resolved deploy.yaml that launched the run (written by orch)
PID_FILE = "pid"
RUN_LOCK = "lock"  # held (flock) by the one trainer of this run directory, for its whole life
TRAIN_LOG = "train.log"
METRICS = "metrics.jsonl"
STATUS = "status.json"
MANIFEST = "MANIFEST.sha256"
TENSORBOARD_DIR = "tensorboard"

CHECKPOINTS_DIR = "checkpoints"
BEST_WEIGHTS = f"{CHECKPOINTS_DIR}/best.weights.h5"
LAST_WEIGHTS = f"{CHECKPOINTS_DIR}/last.weights.h5"
# Epoch, best-so-far and optimizer step of last.weights.h5: what a killed run continues from.
LAST_STATE = f"{CHECKPOINTS_DIR}/last.state.json"

STATS_DIR = "stats"
STATS_MEAN = "wav2vec_mean.npy"
STATS_STD = "wav2vec_std.npy"
CLASSES_JSON = "classes.json"
SPLIT_JSON = "split.json"
EVALUATION_JSON = "evaluation.json"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"

# status.json "state" values.
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
STOPPED = "stopped"
FINAL_STATES = (FINISHED, FAILED, STOPPED)

# Keys of one metrics.jsonl line (more may follow; readers must ignore unknown keys).
METRIC_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


def stats_path(name: str) -> str:
    """Path of a stats/ file relative to the run directory."""
    return f"{STATS_DIR}/{name}"


def run_dir(remote_root: str, run_id: str) -> str:
    """``<remote_root>/runs/<run_id>`` (POSIX, since runs live on a Linux machine)."""
    return str(PurePosixPath(remote_root) / RUNS_DIR / run_id)


def manifest_line(sha256_hex: str, rel_path: str) -> str:
    """One line in ``sha256sum`` format: ``<hex>  <relative path>``."""
    return f"{sha256_hex}  {rel_path}"


def parse_manifest(text: str) -> dict[str, str]:
    """``{relative path: sha256 hex}`` from a MANIFEST.sha256 text (sha256sum format)."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"malformed manifest line: {line!r}")
        entries[rel.lstrip("*")] = digest
    return entries
