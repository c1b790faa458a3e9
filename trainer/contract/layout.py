"""The run directory: the one contract between ``orchestrator`` and ``trainer``.

Standard library only: both halves import it, so every file name either half uses on the machine
(runs, code, environments, locks, the watcher's files, the data folder's staging) is written
down here exactly once.

    <remote_root>/
      code/<version>/     the uploaded trainer package (.complete once whole; code/.lock)
      envs/<key>/         managed virtualenvs (.orch-ready once pip succeeded; install.log)
      runs/<run_id>/      one folder per run, below
      notify/<run_id>.json  a run's webhook settings (0600)
      launch.lock  activity.lock  autostop.json  spot.json  watcher.json  watcher.log  watcher.lock
      tensorboard.json  tensorboard.lock  tensorboard.users.lock  tensorboard.log

    <remote_root>/runs/<run_id>/
      run.json  deploy.json  pid  lock  train.log  metrics.jsonl  status.json  MANIFEST.sha256
      interruption.json                        a spot notice the watcher saw (never in the manifest)
      train.raw.log                            the trainer's output unfiltered (train.log: stamped, no noise)
      checkpoints/state.json                   the commit point (see below)
      checkpoints/epoch-NNNN.weights.h5        weights + optimizer state of a committed epoch
      checkpoints/epoch-NNNN-batch-BBBB.weights.h5   ... of a committed position inside epoch NNNN
      checkpoints/best.weights.h5              the best epoch's file (hard link, or a copy)
      stats/wav2vec_mean.npy  wav2vec_std.npy  classes.json  split.json
            evaluation.json  training_curves.png  confusion_matrix.png
      tensorboard/train/events.out.tfevents.orch       TensorBoard's scalars, one event per committed
      tensorboard/validation/events.out.tfevents.orch  epoch (step: the epoch, after the parent's)

One trainer per run directory: it holds an flock on ``lock`` for its whole life (taken before
it writes anything; a second trainer exits busy, exit 6, naming the holder's pid).

**The commit point.** A finished epoch N is committed in this order, and only at step 2:

1. the weights (model and optimizer state, so the optimizer step continues exactly) are
   written to a temp name in ``checkpoints/``, fsynced, hashed once, renamed to
   ``checkpoints/epoch-NNNN.weights.h5``; the folder is fsynced;
2. ``checkpoints/state.json`` is atomically replaced (temp, fsync, rename, fsync folder). It
   holds the epoch, ``last`` and ``best`` (file + sha256), best_val_accuracy, best_epoch, the
   parent's best, the full metrics history and ``rng``: the states of the model's random
   generators at the end of ``last`` (the weights file leaves them out), so a continued run
   trains exactly like an uninterrupted one. This is the ONLY commit point.

**A position inside an epoch** is committed the same way when a stop (SIGTERM) comes long
before the epoch's end: its weights go to ``checkpoints/epoch-NNNN-batch-BBBB.weights.h5``
(epoch N in progress, its first B batches trained), then state.json names it in ``partial``:
``epoch`` (N, always the committed epoch + 1), ``batch`` (B), ``file`` and ``sha256``, ``rng``
(the random generators' states after batch B), ``metrics`` (the metric accumulators: the
running sums of loss and accuracy over the B batches) and ``seconds`` (the epoch's training
time so far). The batch plan of an epoch is a function of (seed, epoch), so a continued run
trains batches B+1.. of the same plan and records the epoch exactly as an uninterrupted run
would. The next epoch commit drops ``partial`` (its file is then deleted like any unnamed one).

Everything else is derived from the committed state, and a restart re-derives it before it
trains: metrics.jsonl (rewritten from the history), the TensorBoard event files (the epochs
they lack appended, whatever disagrees with the history cut first), status.json,
best.weights.h5 (a hard link, or a copy where links fail, of the state's best file),
MANIFEST.sha256; epoch files the state no longer names are deleted, and so are temp files
(names starting with ``.tmp-``). An extended run (``--init-from PARENT``) commits the parent's
best weights as its epoch 0 (``best_epoch`` 0: the parent's weights are still the best).

**The manifest rule.** ``sha256sum -c MANIFEST.sha256`` passes at every instant, whatever was
killed: the manifest lists only files that do not change while it lists them. Always: run.json,
the statistics inputs (mean, std, classes.json, split.json) and best.weights.h5 (its sha256
comes from the state, never from re-reading it). Only while the run is in a final state
(finished, failed, stopped, interrupted): status.json, metrics.jsonl, the evaluation outputs and
the TensorBoard event files; a continued run rewrites the manifest without them before it
changes them. best.weights.h5 is replaced as: manifest without it -> replace -> manifest with
it. Until there is something to list (run.json or a best checkpoint) there is no manifest:
``sha256sum -c`` needs at least one line.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

RUNS_DIR = "runs"
CODE_DIR = "code"
CODE_COMPLETE = ".complete"  # in code/<version>/: the version is unpacked whole
CODE_LOCK = ".lock"  # in code/: held while a version is unpacked (two deploys never remove each other's)
SETUP_LOG = "setup.log"  # in code/<version>/: remote.setup's output
SETUP_DONE = ".setup-done"  # ... it succeeded for this code version
SETUP_LOCK = ".setup.lock"  # ... held while it runs
ENVS_DIR = "envs"
ENV_READY = ".orch-ready"  # in envs/<key>/: written (atomically) only after pip succeeded
ENV_LOG = "install.log"  # in envs/<key>/: pip's output
ENV_LOCK_SUFFIX = ".lock"  # envs/<key>.lock: one install of an env at a time
PREFLIGHT_CACHE = "orch/preflight"  # below $XDG_CACHE_HOME (~/.cache): the TensorFlow import check
# In the data folder: a file set written by `trainer synth` (every output made from it says so).
SYNTHETIC_MARKER = "SYNTHETIC_DATA.txt"
# Held (flock) by orch's busy check + launch on the machine: one launch at a time.
LAUNCH_LOCK = "launch.lock"
# Autostop (trainer/machine/watcher.py), under remote.root: the setting, what the watcher last saw,
# its decisions, and the lock the one running watcher holds.
AUTOSTOP_SETTING = "autostop.json"
# Spot watching (the same watcher): {"metadata_url", "armed_at"}, written by a launch on a spot instance.
SPOT_SETTING = "spot.json"
WATCHER_STATE = "watcher.json"
WATCHER_LOG = "watcher.log"
WATCHER_LOCK = "watcher.lock"
# Held (shared flock) by every orch command doing work on the machine (deploy, resume,
# download): the machine is not idle while one runs, whatever the runs say.
ACTIVITY_LOCK = "activity.lock"
# Run notifications (trainer/contract/notify.py): <NOTIFY_DIR>/<run_id>.json under remote.root, the
# webhook settings of one run (0600, the folder 0700: a webhook URL is a credential). Never in a
# run folder: run folders are downloaded and mirrored.
NOTIFY_DIR = "notify"
# `orch tensorboard` (trainer/machine/tboard.py), under remote.root: the one TensorBoard's pid,
# port and runs; the lock held while it is started, reused or stopped; the lock every command
# using it holds (shared) while it lives; its output.
TENSORBOARD_STATE = "tensorboard.json"
TENSORBOARD_LOCK = "tensorboard.lock"
TENSORBOARD_USERS = "tensorboard.users.lock"
TENSORBOARD_LOG = "tensorboard.log"

RUN_JSON = "run.json"
DEPLOY_JSON = "deploy.json"  # the resolved deploy.yaml that launched the run (written by orch)
PID_FILE = "pid"
GPU_FILE = "gpu"  # the one GPU (index) the run was launched on, beside runs on the others; absent: all of them
RUN_LOCK = "lock"  # held (flock) by the one trainer of this run directory, for its whole life
TRAIN_LOG = "train.log"  # the trainer's output, each line timestamped, TensorFlow's known start-up noise left out
# All of it as it came (trainer/machine/logfilter.py): the machine's own, never listed nor mirrored.
RAW_LOG = "train.raw.log"
METRICS = "metrics.jsonl"
STATUS = "status.json"
MANIFEST = "MANIFEST.sha256"
# The trainer's sign of life while it works (trainer/ml/heartbeat.py): never listed in the manifest.
HEARTBEAT = "heartbeat.json"
# The storage mirror's report (trainer/ml/mirror.py): what it last uploaded, or why it retries.
MIRROR_STATUS = "mirror.json"
TENSORBOARD_DIR = "tensorboard"
# TensorBoard's event files (trainer/ml/tbevents.py): one per writer, one event per committed
# epoch, appended after each commit; listed only in a final state.
TENSORBOARD_TRAIN = f"{TENSORBOARD_DIR}/train/events.out.tfevents.orch"
TENSORBOARD_VALIDATION = f"{TENSORBOARD_DIR}/validation/events.out.tfevents.orch"
TENSORBOARD_FILES = (TENSORBOARD_TRAIN, TENSORBOARD_VALIDATION)
# A spot interruption notice, written by the watcher before it SIGTERMs the run's trainer
# ({"action", "notice_time", "noticed_at"}: wire.Interruption): the machine's own, never listed
# in the manifest nor mirrored.
INTERRUPTION = "interruption.json"

CHECKPOINTS_DIR = "checkpoints"
BEST_WEIGHTS = f"{CHECKPOINTS_DIR}/best.weights.h5"
# The commit point: what a killed run continues from, and what everything else derives from.
STATE = f"{CHECKPOINTS_DIR}/state.json"
# The layout before the commit point (last.weights.h5 + this): refused with one clear error.
LEGACY_STATE = f"{CHECKPOINTS_DIR}/last.state.json"
# Temp files (renamed into place, or removed by the next start) start with this.
TEMP_PREFIX = ".tmp-"

STATS_DIR = "stats"
STATS_MEAN = "wav2vec_mean.npy"
STATS_STD = "wav2vec_std.npy"
# With --normalization speaker: the training split's statistics of the raw features, for the
# files of speakers too few files have to be normalized on their own (trainer/ml/speakers.py).
FALLBACK_MEAN = "fallback_mean.npy"
FALLBACK_STD = "fallback_std.npy"
CLASSES_JSON = "classes.json"
SPLIT_JSON = "split.json"
EVALUATION_JSON = "evaluation.json"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
# Written before training and never changed afterwards: listed in the manifest at once.
STATS_INPUTS = (STATS_MEAN, STATS_STD, FALLBACK_MEAN, FALLBACK_STD, CLASSES_JSON, SPLIT_JSON)
# Written when the run ends: listed only in a final state.
STATS_OUTPUTS = (EVALUATION_JSON, CURVES_PNG, CONFUSION_PNG)

# status.json "state" values.
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
STOPPED = "stopped"
# Stopped by a spot interruption notice (status.json "interruption" says which and when): it
# continues like a stopped run, on the same machine or, restored from storage, on a new one.
INTERRUPTED = "interrupted"
FINAL_STATES = (FINISHED, FAILED, STOPPED, INTERRUPTED)
# status.json "reason" of a failed run that ran out of disk (its exit code is 14, not 8).
DISK_FULL = "disk_full"
# status.json "reason" of an interrupted run: a spot instance-action notice.
SPOT_INTERRUPTION = "spot_interruption"

# Keys of one metrics.jsonl line (more may follow; readers must ignore unknown keys).
METRIC_KEYS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")
# ... those that measure wall-clock time: the only ones two runs of one command may differ in.
TIMING_KEYS = ("seconds",)


_CHECKPOINT = re.compile(r"epoch-(\d{4,})(?:-batch-(\d{4,}))?\.weights\.h5")


# An upload's bookkeeping, a hidden folder INSIDE the data folder (never read as data, and on
# the data's own file system even when the data folder is a mount point: every move a rename):
# its lock (one upload into a data folder at a time) and each upload's staging folder.
DATA_UPLOAD_DIR = ".orch-upload"
DATA_UPLOAD_LOCK = "lock"
DATA_STAGING_PREFIX = "incoming-"


# What a run id may be: it names a folder on the machine and one on the laptop.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def is_run_id(text: str) -> bool:
    return RUN_ID.match(text) is not None


def epoch_weights(epoch: int, batch: int | None = None) -> str:
    """``checkpoints/epoch-NNNN.weights.h5``: the weights of committed epoch ``epoch``; with
    ``batch``, ``checkpoints/epoch-NNNN-batch-BBBB.weights.h5``: those of a position inside it."""
    inside = "" if batch is None else f"-batch-{batch:04d}"
    return f"{CHECKPOINTS_DIR}/epoch-{epoch:04d}{inside}.weights.h5"


def checkpoint_of(name: str) -> tuple[int, int | None] | None:
    """(epoch, batch or None) of a checkpoint file's name (``epoch-0007.weights.h5`` -> (7, None),
    ``epoch-0007-batch-0012.weights.h5`` -> (7, 12)); None for any other name."""
    match = _CHECKPOINT.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def epoch_of(name: str) -> int | None:
    """The epoch of a checkpoint file's name (``epoch-0007.weights.h5`` -> 7; a position's too), else None."""
    found = checkpoint_of(name)
    return None if found is None else found[0]


def is_temp(name: str) -> bool:
    """Whether a file name is a temp file of the trainer's (never a committed file)."""
    return name.startswith(TEMP_PREFIX)


def manifest_candidates(final: bool) -> list[str]:
    """The files MANIFEST.sha256 lists when they exist (the manifest rule above), in order."""
    rels = [BEST_WEIGHTS, RUN_JSON] + [stats_path(n) for n in STATS_INPUTS]
    if final:
        rels += [STATUS, METRICS] + [stats_path(n) for n in STATS_OUTPUTS] + list(TENSORBOARD_FILES)
    return rels


def stats_path(name: str) -> str:
    """Path of a stats/ file relative to the run directory."""
    return f"{STATS_DIR}/{name}"


def run_dir(remote_root: str, run_id: str) -> str:
    """``<remote_root>/runs/<run_id>`` (POSIX, since runs live on a Linux machine)."""
    return str(PurePosixPath(remote_root) / RUNS_DIR / run_id)


def notify_settings(remote_root: str, run_id: str) -> str:
    """``<remote_root>/notify/<run_id>.json``: the run's webhook settings."""
    return str(PurePosixPath(remote_root) / NOTIFY_DIR / f"{run_id}.json")


# ---- the storage mirror (deploy.yaml `storage:`) ---------------------------------------------
#
#     <s3_uri>/runs/<run_id>/<the same relative paths as on the machine>
#
# Each object carries its whole-file sha256 as metadata (x-amz-meta-sha256). What S3 holds is
# always a committed state: checkpoints/state.json is uploaded last, after every file it names;
# epoch files it no longer names are deleted only after it; MANIFEST.sha256 lists only objects
# whose sha256 it states (it is rewritten without an entry before that object changes).
STORAGE_SHA_KEY = "sha256"
# Mirrored besides the state, its files and the manifest: never the machine's own files (pid, lock,
# heartbeat, the mirror's report) nor temp files; under tensorboard/ only the trainer's event files.
NOT_MIRRORED = frozenset({PID_FILE, RUN_LOCK, GPU_FILE, HEARTBEAT, MIRROR_STATUS, INTERRUPTION})


def is_mirrored(rel: str) -> bool:
    """Whether a run folder's file (a relative POSIX path) belongs in its storage mirror."""
    parts = rel.split("/")
    if parts[0] == TENSORBOARD_DIR:
        return rel in TENSORBOARD_FILES
    return parts[0] not in NOT_MIRRORED and not is_temp(parts[-1])


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix"); ValueError when it is not one."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^\x00-\x1f]*)?", uri)
    if not match:
        raise ValueError(f"{uri!r} is not an s3://bucket[/prefix] URI")
    return match.group(1), (match.group(2) or "").strip("/")


def storage_run_prefix(prefix: str, run_id: str) -> str:
    """The key prefix of a run's objects: ``<prefix>/runs/<run_id>/``."""
    return "/".join(p for p in (prefix, RUNS_DIR, run_id) if p) + "/"


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
