"""``python -m trainer train``: from a data directory to a finished run directory.

Read top to bottom: take the run directory's lock -> resolve the config (a new run, a
continued one, or one extended from a parent) -> repair what a kill left half-done -> load
data -> split -> normalization stats -> model -> fit, committing every finished epoch ->
evaluate the best checkpoint -> finished. Each epoch is committed at one point (see
trainer/contract/layout.py), so a kill at any moment loses at most the epoch in progress; a full disk
ends the run ``failed`` with the last committed epoch kept.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.codeversion import code_version
from trainer.contract.files import disk_full_error
from trainer.contract.wire import Recovery, accuracy_text, best_epoch_text
from trainer.machine import faults
from trainer.machine.fsutil import atomic_write_json, link_or_copy
from trainer.machine.proc import started_at
from trainer.ml import layerselect, runlock, runstate, speakers, stopping
from trainer.ml.config import TrainConfig
from trainer.ml.data import load_dataset
from trainer.ml.dataset import require_samples
from trainer.ml.errors import DataError, DiskFull, ExitCode, TrainerError, TrainingFailed, UsageError
from trainer.ml.rundir import RunDir, now_iso
from trainer.ml.split import Split, load_split, make_split, save_split
from trainer.ml.stats import Stats, compute_stats, find_stats, load_stats, save_stats
from trainer.ml.stopping import Stopper, StopRequested

Log = Callable[[str], None]



def _log(msg: str) -> None:
    # train.log may sit on the very disk that is full: logging is not worth a crash
    with contextlib.suppress(OSError):
        print(f"[trainer] {msg}", flush=True)


def train(cfg: TrainConfig, log: Log = _log, recovery: Recovery | None = None,
          on_recovered: Callable[[Recovery], None] | None = None) -> ExitCode:
    """Train (or continue) the run in ``cfg.run_dir``; returns the exit code for the CLI.
    ``recovery``: orch continues the run after a preemption or a restart; it is recorded in
    the committed state before anything else happens (then ``on_recovered`` is told, once)."""
    path = Path(cfg.run_dir)
    # A spot notice counts for this trainer only if the watcher wrote it after the process started.
    since = started_at(os.getpid()) or time.time()
    runlock.hold(path)  # before anything is written: a second trainer leaves no trace (RunBusy)
    run = RunDir(path)
    # ---- a run directory that already has a run.json is continued, with its own config
    previous = run.read_json(layout.RUN_JSON)
    if previous is not None:
        cfg = TrainConfig.from_json(previous["config"])
    run.state = runstate.read(path) or runstate.initial(cfg.parent_run, cfg.parent_best_val_accuracy)
    run.step_offset = cfg.parent_step
    if (run.read_json(layout.STATUS) or {}).get("state") == layout.FINISHED:
        try:
            run.repair(None, final=True)  # a kill may have cut the final publish short
        except OSError as exc:
            full = disk_full_error(exc)
            if full is None:
                raise
            raise _disk_full(run, full) from exc
        log(f"run {path.name} already finished; nothing to do (extend it with --init-from)")
        return ExitCode.OK
    try:
        with Stopper() as stopper:
            run.create()
            if recovery is not None:  # before the repair: the status it writes carries the record
                recorded = _record_recovery(run, recovery, log)
                if recorded is not None and on_recovered is not None:
                    on_recovered(recorded)
            run.write_pid()
            run.heartbeat.beat(force=True, phase="starting")
            # The repair comes before any status write: a final state's manifest lists status.json.
            run.repair(layout.RUNNING, epochs=cfg.epochs, phase="loading data", run_id=path.name,
                       parent=cfg.parent_run)
            return _train(cfg, run, previous, stopper, log, since)
    except StopRequested as stop:
        return _stopped(run, stop.signum, since, log)
    except Exception as exc:
        full = disk_full_error(exc)
        if full is not None:
            error = _disk_full(run, full)
            run.fail_on_full_disk(str(error))
            log(f"failed: {error}")
            raise error from exc
        run.finish(layout.FAILED, error=str(exc) if isinstance(exc, TrainerError) else f"{type(exc).__name__}: {exc}")
        raise


def _record_recovery(run: RunDir, recovery: Recovery, log: Log) -> Recovery | None:
    """Commit the state with ``recovery`` recorded (once: a relaunch gives the same record
    again); the record as committed, None when it already was. The trainer knows best which
    committed epoch it continues from; the time lost is orch's figure, else the time from the
    recovery's ``at`` to now (the machine's clock)."""
    state = run.state
    lost = recovery.lost_seconds
    if lost is None:
        now = datetime.now(timezone.utc)
        when = recovery.when if recovery.when.tzinfo is not None else recovery.when.replace(tzinfo=timezone.utc)
        lost = max(0.0, round((now - when).total_seconds(), 3))
    record = replace(recovery, epoch_restored=state.epoch, lost_seconds=lost)
    recorded = state.with_recovery(record)
    if recorded is state:
        log(f"recovery at {recovery.at} is already recorded")
        return None
    run.commit(recorded)
    where = f"epoch {state.epoch}" + (f", batch {state.partial.batch} of epoch {state.partial.epoch}"
                                      if state.partial is not None else "")
    log(f"recovery {len(recorded.recoveries)} recorded ({recovery.kind}: {recovery.why}); continuing from {where}")
    return record


def _disk_full(run: RunDir, exc: OSError) -> DiskFull:
    where = exc.filename or run.path
    return DiskFull(f"no space left on device on {where}: free space and run "
                    f"`orch resume {run.path.name} --continue`")


@dataclass(frozen=True)
class _Inputs:
    """What the model is trained and validated on: the data, its split, the normalization."""

    ds: Any
    split: Split
    stats: Stats
    layers: str  # --layers, resolved (auto -> the probe's layer numbers)


def _stopped(run: RunDir, signum: int, since: float, log: Log) -> ExitCode:
    """The run ends ``stopped`` (or ``interrupted``, when a spot notice came with the signal), its
    position committed; the last line says what is kept and how to continue."""
    notice = stopping.interruption(run.path, since)
    if notice is None:
        run.finish(layout.STOPPED, error=None)
        log(f"stopped by signal {signum} {_kept(run)}; continue with `orch resume {run.path.name} --continue`")
    else:
        run.finish(layout.INTERRUPTED, error=None, reason=layout.SPOT_INTERRUPTION, interruption=notice.to_json())
        log(f"{notice.describe()} {_kept(run)}; continue with `orch resume {run.path.name} --continue`")
    return ExitCode.RUN_STOPPED


def _kept(run: RunDir) -> str:
    """'after epoch 3 and batch 5 of epoch 4': what a stopped run keeps."""
    state, partial = run.state, run.state.partial
    kept = [f"epoch {state.epoch}"] if state.epoch else []
    if partial is not None:
        kept.append(f"batch {partial.batch} of epoch {partial.epoch}")
    return f"after {' and '.join(kept)}" if kept else "before its first epoch"


def _train(cfg: TrainConfig, run: RunDir, previous: dict | None, stopper: Stopper, log: Log,
           since: float) -> ExitCode:
    inputs = _inputs(cfg, run, log)
    cfg = replace(cfg, layers=inputs.layers)  # what run.json records, evaluate and predict apply
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras (and TensorFlow) load
    precision = _precision(cfg, previous)
    model, train_seq, val_seq, devices, scope = _model(cfg, run, inputs, precision.policy, log)
    with scope():  # a checkpoint loads into the strategy's variables in its scope, as they were made
        _starting_point(cfg, run, model, log)
    if previous is None:
        _write_run_json(cfg, run, inputs, precision.to_json(), devices)
    recorder = _fit(cfg, run, model, train_seq, val_seq, stopper, log)
    if recorder.failure:
        raise TrainingFailed(recorder.failure)
    if stopper.signum is not None:
        return _stopped(run, stopper.signum, since, log)
    # ---- evaluate the best checkpoint on the validation split, then finish
    run.heartbeat.beat(force=True, phase="evaluating")
    _final_evaluation(run, model, inputs, list(run.state.history), log)
    faults.point("finish:evaluated")
    run.finish(layout.FINISHED)
    state = run.state
    log(f"finished: best val_accuracy {accuracy_text(state.best_val_accuracy)} at {best_epoch_text(state.best_epoch)}")
    return ExitCode.OK


def _inputs(cfg: TrainConfig, run: RunDir, log: Log) -> _Inputs:
    """Data, split and statistics (reused from this run or the parent when they exist)."""
    ds = load_dataset(cfg.data_dir, cfg.classes, cache_dir=cfg.cache_dir, use_cache=cfg.cache,
                      progress=lambda done, total: run.heartbeat.beat(phase="loading data", files=done, of=total))
    require_samples(ds)
    log(f"{len(ds)} samples, per-frame shape {ds.feature_shape}, {len(ds.skipped)} files skipped "
        f"(cache: {ds.cache})")
    split = _split(cfg, run, ds, log)
    layers = layerselect.resolve(cfg.layers, ds, split, log)
    layerselect.take(ds, layers)  # once, on the host, as the normalization below
    if cfg.normalization == speakers.SPEAKER:  # once, on the host, before the global statistics
        speakers.normalize_training_data(ds, split, cfg.speaker_min_files, run.file(layout.STATS_DIR),
                                         Path(cfg.stats_dir) if cfg.stats_dir else None, log)
    stats = _stats(cfg, run, ds, split, log)
    _write_classes(run, cfg.classes)
    return _Inputs(ds, split, stats, layers)


def _model(cfg: TrainConfig, run: RunDir, inputs: _Inputs, policy: str, log: Log
           ) -> tuple[Any, Any, Any, str, Any]:
    """The compiled model, in the dtype ``policy``, its training and validation batches, the
    devices it trains on (in words) and their scope (TensorFlow/Keras imported only now)."""
    run.heartbeat.beat(force=True, phase="building the model")
    import keras

    from trainer.ml.fitting import augmentation, compile_model
    from trainer.ml.model import build_model
    from trainer.ml.pipeline import BatchSequence, balanced_class_weights

    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(policy)
    ds, split = inputs.ds, inputs.split
    labels = ds.label_ids()
    weights = balanced_class_weights(labels[split.train], len(cfg.classes)) if cfg.class_weights else None
    scope, devices, replicas = _distribution()
    train_seq = BatchSequence(ds, split.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                              epoch=run.state.epoch, class_weights=weights, replicas=replicas)
    val_seq = BatchSequence(ds, split.val, cfg.batch_size, shuffle=False, replicas=replicas)
    steps = len(train_seq)
    with scope():
        model = build_model(cfg.architecture, inputs.stats, len(cfg.classes), augmentation=augmentation(cfg),
                            head_dropout=cfg.head_dropout, layer_weighting=cfg.layer_weighting)
        compile_model(model, cfg, steps, replicas)
    log(f"model: {model.count_params():,} parameters on {devices}, {keras.mixed_precision.global_policy().name}; "
        f"{steps} batches per epoch")
    return model, train_seq, val_seq, devices, scope


def _precision(cfg: TrainConfig, previous: dict | None) -> Any:
    """The dtype policy: the one run.json recorded (a continued run trains as it started), else
    the one chosen for this device (trainer/ml/precision.py)."""
    from trainer.ml import precision

    chosen = precision.choose(cfg.mixed_precision, precision.training_device())
    recorded = (previous or {}).get("precision")
    if isinstance(recorded, dict) and recorded.get("policy") in precision.POLICIES:
        return replace(chosen, policy=recorded["policy"], reason="recorded in run.json")
    return chosen


def _starting_point(cfg: TrainConfig, run: RunDir, model: Any, log: Log) -> None:
    """Our own last position or epoch (weights, optimizer and random generators), the parent's
    weights (an extended run's committed epoch 0), or scratch."""
    from trainer.ml import trainstate

    state = run.state
    partial = state.partial
    if partial is not None or state.last is not None:
        model.load_weights(run.file(partial.weights.file if partial is not None else state.last.file))
        rng = partial.rng if partial is not None else state.rng
        if rng is not None:  # None: a state of an older trainer (the run continues, though not exactly)
            trainstate.assign(trainstate.rng_variables(model), rng, "random generators' states")
        where = f"batch {partial.batch} of epoch {partial.epoch}" if partial is not None else f"epoch {state.epoch}"
        log(f"continuing from {where} (best val_accuracy {accuracy_text(state.best_val_accuracy)})")
    elif state.best is not None:
        _load_initial_weights(model, run.file(state.best.file), "--init-from")
        log(f"starting from the parent's weights ({state.best.file})")
    elif cfg.init_from:
        _init_from(cfg, run, model, log)


def _write_run_json(cfg: TrainConfig, run: RunDir, inputs: _Inputs, precision: dict[str, Any], devices: str) -> None:
    """run.json: everything needed to rebuild the model and to know where the run came from,
    and the dtype policy it trains in (with the device and why)."""
    import keras

    atomic_write_json(run.file(layout.RUN_JSON), {
        "run_id": run.path.name,
        "config": cfg.to_json(),
        "classes": list(cfg.classes),
        "feature_shape": list(inputs.ds.feature_shape),
        "parent_run": cfg.parent_run,
        "code_version": code_version(),
        "started_at": now_iso(),
        "backend": keras.backend.backend(),
        "precision": precision,
        "devices": devices,  # what trained it: "CPU", "1 GPU", "4 GPUs (MirroredStrategy)"
        "keras_version": keras.__version__,
        "samples": {"train": int(len(inputs.split.train)), "validation": int(len(inputs.split.val)),
                    "skipped_files": len(inputs.ds.skipped)},
    })


def _fit(cfg: TrainConfig, run: RunDir, model: Any, train_seq: Any, val_seq: Any, stopper: Stopper,
         log: Log) -> Any:
    """Fit, committing every finished epoch; a stop is handled by the recorder (trainer/ml/stopping.py).
    A committed position is continued first: one ``fit`` over the rest of its epoch, then one
    over the epochs after it."""
    from trainer.ml.fitting import training_callbacks
    from trainer.ml.recorder import RunRecorder

    recorder = RunRecorder(run, stopper, log, train_seq)
    partial = run.state.partial
    callbacks: list[Any] = training_callbacks(cfg, recorder, log=log,
                                              averaged_in_model=run.state.last is not None and partial is None)
    run.publish(layout.RUNNING, phase="training")  # run.json is listed from now on
    run.heartbeat.beat(force=True, phase="compiling the first batches")
    # shuffle=False: the plan is the batch order (from (seed, epoch)); Keras would shuffle it
    # again with Python's global generator, which a continued run cannot replay.
    fit = functools.partial(model.fit, validation_data=val_seq, callbacks=callbacks, shuffle=False, verbose=2)
    stopper.training = True  # from now on a signal is the recorder's to handle
    if partial is not None:
        train_seq.on_epoch_end()  # to the plan of the position's epoch (see BatchSequence)
        fit(train_seq.rest_of_epoch(partial.batch), epochs=partial.epoch, initial_epoch=partial.epoch - 1)
    stopped = partial is not None and (model.stop_training or stopper.signum is not None)
    if not stopped and run.state.epoch < cfg.epochs:
        fit(train_seq, epochs=cfg.epochs, initial_epoch=run.state.epoch)
    stopper.training = False
    return recorder


def _split(cfg: TrainConfig, run: RunDir, ds: Any, log: Log) -> Split:
    """This run's split.json, else the parent's, else a new split (saved either way)."""
    own = run.file(layout.stats_path(layout.SPLIT_JSON))
    parent = Path(cfg.init_from) / layout.stats_path(layout.SPLIT_JSON) if cfg.parent_run else None
    source = own if own.is_file() else parent if parent is not None and parent.is_file() else None
    if source is not None:
        split, missing = load_split(source, ds)
        if missing:
            log(f"warning: {len(missing)} files of {source} are no longer usable, e.g. {missing[0]}")
    else:
        split = make_split(ds, cfg.split, cfg.val_fraction, cfg.seed)
    if source != own:
        save_split(split, ds, own)
    log(f"split {split.method}: {len(split.train)} train, {len(split.val)} validation")
    return split


def _stats(cfg: TrainConfig, run: RunDir, ds: Any, split: Split, log: Log) -> Stats:
    """This run's stats, else --stats-dir (or the parent's), else the data dir's, else computed
    on the training split. Whatever is used is saved into the run's stats/."""
    own = run.file(layout.STATS_DIR)
    given = Path(cfg.stats_dir) if cfg.stats_dir else None
    if given is not None and find_stats(own) is None and find_stats(given) is None:
        raise DataError(f"--stats-dir {cfg.stats_dir}: no {layout.STATS_MEAN} / {layout.STATS_STD} there")
    # A data folder's own statistics describe raw features: not per-speaker normalized ones.
    data_dir = Path(cfg.data_dir) if cfg.normalization == speakers.GLOBAL else None
    source = next((d for d in (own, given, data_dir) if d is not None and find_stats(d)), None)
    if source is None:
        stats = compute_stats(ds, split.train)
        log("normalization statistics computed on the training split")
    else:
        stats = load_stats(source, ds.feature_shape)
        log(f"normalization statistics from {source}")
    if source != own:
        save_stats(stats, own)
    return stats


def _init_from(cfg: TrainConfig, run: RunDir, model: Any, log: Log) -> None:
    """Load the parent's best weights (not its optimizer state). For a parent run they are
    committed as this run's epoch 0: its best until this run beats it (best_epoch 0)."""
    source = Path(cfg.init_from)
    weights = source / layout.BEST_WEIGHTS if source.is_dir() else source
    _load_initial_weights(model, weights, f"--init-from {weights}")
    if cfg.parent_run:
        saved = run.write_checkpoint(0, lambda tmp: link_or_copy(weights, tmp))
        run.commit(run.state.with_parent_weights(saved))
        run.publish(layout.RUNNING)
    log(f"initialized from {weights}" + (f" (parent best val_accuracy {accuracy_text(cfg.parent_best_val_accuracy)})"
                                         if cfg.parent_run else ""))


def _load_initial_weights(model: Any, weights: Path, what: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns once per layer it cannot match
            model.load_weights(weights, objects_to_skip=[model.optimizer])
    except (ValueError, KeyError, OSError) as exc:
        raise UsageError(f"{what}: weights do not fit this architecture "
                         f"(--hidden/--attention must match the run that wrote them): {exc}") from exc


def _write_classes(run: RunDir, classes: tuple[str, ...]) -> None:
    """stats/classes.json, written once: the manifest lists it, so it is never rewritten."""
    path = run.file(layout.stats_path(layout.CLASSES_JSON))
    try:
        if json.loads(path.read_text()) == list(classes):
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, list(classes))


def _distribution() -> tuple[Any, str, int]:
    """The scope the model is built in (a context manager factory), the devices in words, and
    the replicas each batch is split across: MirroredStrategy across the GPUs when more than one is visible (TensorFlow
    backend), or across the CPU's logical devices when it was split into several (how the tests
    run this path: tests/integration/two_cpus.py). The batch size is the global one (each of N
    replicas computes 1/N of it) and the learning rate stays: the loss is the batch's mean, as on
    one device."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        devices = gpus or tf.config.list_logical_devices("CPU")
        if len(devices) > 1:
            strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
            return strategy.scope, f"{len(devices)} {'GPU' if gpus else 'CPU'}s (MirroredStrategy)", len(devices)
        return contextlib.nullcontext, "1 GPU" if gpus else "CPU", 1
    return contextlib.nullcontext, keras.backend.backend(), 1


def _final_evaluation(run: RunDir, model: Any, inputs: _Inputs, history: list[dict[str, Any]], log: Log) -> None:
    from trainer.ml.evaluate import classification_report, plot_confusion, plot_curves, predict_probabilities

    ds, split = inputs.ds, inputs.split
    best = run.file(layout.BEST_WEIGHTS)
    if best.is_file():
        model.load_weights(best, objects_to_skip=[model.optimizer])
    probs = predict_probabilities(model, [ds.sequence(int(i)) for i in split.val])
    report = classification_report(ds.label_ids()[split.val], probs.argmax(axis=1), ds.classes)
    atomic_write_json(run.file(layout.stats_path(layout.EVALUATION_JSON)), report)
    # The plots carry the run id, mark the kept (best) checkpoint, and say when data is synthetic.
    note = "SYNTHETIC data" if (ds.root / layout.SYNTHETIC_MARKER).is_file() else ""
    best_epoch = run.state.best_epoch
    if history:
        plot_curves(history, run.file(layout.stats_path(layout.CURVES_PNG)), run.path.name, best_epoch, note)
    plot_confusion(report, run.file(layout.stats_path(layout.CONFUSION_PNG)), run.path.name, note)
    log(f"validation: accuracy {report['accuracy']:.4f}, unweighted accuracy "
        f"{report['unweighted_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}")
