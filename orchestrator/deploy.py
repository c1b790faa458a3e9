"""``orch deploy`` and ``orch resume``, SkyPilot-style steps over one connection: provision
(orchestrator/provision.py: start the instance) -> sync code (and data) -> setup (the managed
env, remote.setup) -> preflight (can this machine train?) -> launch the trainer detached,
atomically -> verify it started -> autostop."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from orchestrator import completion, storage
from orchestrator.autostop import AutostopPlan, describe, launch_args
from orchestrator.autostop import plan as autostop_plan
from orchestrator.config import DeployConfig
from orchestrator.context import Context
from orchestrator.environment import TrainingPython, ensure_env, run_setup
from orchestrator.errors import BusyError, ConfigError, NoSuchRun, OrchError, RemoteError
from orchestrator.machine import Machine, check_run_id
from orchestrator.notify import settings as notify_settings
from orchestrator.preflight import require_ready
from orchestrator.provision import acquire
from orchestrator.requests import Extension, LaunchOptions
from orchestrator.sync import DataSync, sync_data
from trainer.contract import layout, options, verbs
from trainer.contract.wire import Autostop, LaunchAnswer, Recovery, RunInfo, accuracy_text

START_TIMEOUT = 60.0  # seconds for the trainer to write status.json


@dataclass(frozen=True)
class Launched:
    run_id: str
    run_dir: str
    host: str
    pid: int
    code_version: str
    code_transferred: bool
    data: DataSync | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    instance_id: str | None = None  # the EC2 instance it runs on
    created: bool = False  # this command created that instance (from ec2.launch)

    def to_json(self) -> dict[str, Any]:
        d = {"run_id": self.run_id, "run_dir": self.run_dir, "host": self.host, "pid": self.pid,
             "code_version": self.code_version, "code_transferred": self.code_transferred,
             "instance_id": self.instance_id}
        if self.data is not None:
            d["data"] = {"files": self.data.files, "bytes": self.data.bytes, "method": self.data.method,
                         "skipped": self.data.skipped}
        return d | self.extra


def new_run_id() -> str:
    """Sorts by time, safe in a shell and a path: 20261121-103015-a3f9."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def trainer_argv(cfg: DeployConfig, extra: Sequence[str] = (), overrides: dict[str, Any] | None = None,
                 *, extending: bool = False) -> list[str]:
    """The trainer's options for a run: deploy.yaml's `train:` keys, then ``overrides``, then
    the arguments after `--`; checked against the trainer's own options table before anything
    connects. An extended run takes only the keys its recipe does not decide (options.GIVEN)."""
    given = cfg.train_given()
    if extending:
        given = {k: v for k, v in given.items() if options.BY_NAME[k].on_extend == options.GIVEN}
    argv = options.to_argv(given | (overrides or {})) + list(extra)
    for flag in ("--data-dir", "--run-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ConfigError(f"{flag}: set by orch (data.remote_dir and the run), not after `--`")
    try:
        options.parse_argv(argv, reserved={"init_from": "set by `orch resume`, not after `--`",
                                           "record_recovery": "set by orch when it recovers a run, not after `--`"})
    except options.ArgvError as exc:
        raise ConfigError(f"trainer options: {exc} (`python -m trainer train --help` lists them)") from exc
    return argv


@dataclass(frozen=True)
class Start:
    """What a launch asks for: the run, its options, the interpreter, and the machine's rules."""

    run_id: str
    argv: Sequence[str]
    python: str
    fresh: bool  # a new run (its folder must not exist); else the run folder is continued
    force: bool = False
    autostop: AutostopPlan = AutostopPlan(change=False)
    gpu: int | None = None  # this GPU alone (CUDA_VISIBLE_DEVICES), beside runs on the others
    recovery: Recovery | None = None  # a continued run's recovery, for the trainer to record


def launch(m: Machine, start: Start) -> LaunchAnswer:
    """Start ``python -m trainer train`` detached (it outlives the SSH session).

    ONE remote command (trainer/machine/launch.py) does the busy check, arms autostop, creates
    the run folder and starts the trainer under the machine's launch lock: of two launches at
    the same moment, exactly one starts and the other gets the busy error. Whatever fails after
    the launch says which run was started, and how to follow or stop it.
    """
    # (the dump shows a webhook URL as its host only: orchestrator/config.py)
    resolved = m.cfg.model_dump(mode="json") | {"resolved": {"root": m.root, "code": m.code.path}}
    deploy_json = json.dumps(resolved, indent=2).encode()
    notify = notify_settings(m)
    secret = notify.to_bytes() if notify is not None else b""  # on stdin, before deploy.json: never in argv
    args = [m.root, start.run_id, "--fresh" if start.fresh else "--continue", *(["--force"] if start.force else []),
            *(["--gpu", str(start.gpu)] if start.gpu is not None else []),
            "--python", start.python, "--code", m.code.path, "--data-dir", m.data_dir, *launch_args(start.autostop),
            *(["--spot-metadata-url", m.cfg.ec2.metadata_url] if m.spot else []),  # the watcher asks it for notices
            *(["--notify-bytes", str(len(secret))] if secret else []),
            "--", *start.argv, *storage.trainer_args(m.cfg), *_recovery_args(start.recovery)]
    given = secret + (deploy_json if start.fresh else b"")
    got = m.ask(verbs.LAUNCH, *args, stdin=(lambda fh: fh.write(given)) if given else None)
    answer = LaunchAnswer.from_json(got.record) if isinstance(got.record, dict) else LaunchAnswer()
    if answer.pid is None:
        _refuse(answer, start.run_id, m.remote.host, got.result.stderr)
    assert answer.pid is not None
    m.launched = True
    m.log(f"launched run {start.run_id} (pid {answer.pid}) on {m.remote.host}")
    completion.add(m.cfg, start.run_id)
    if answer.autostop is not None:
        m.log(describe(answer.autostop))
    try:
        wait_started(m, m.run_dir(start.run_id), answer.pid, answer.launched_at or 0.0)
    except OrchError as exc:
        raise type(exc)(f"run {start.run_id} was launched on {m.remote.host} (pid {answer.pid}), but {exc}; follow "
                        f"it with `orch monitor {start.run_id}`, stop it with `orch stop {start.run_id}`") from exc
    return answer


def _recovery_args(recovery: Recovery | None) -> list[str]:
    """The trainer's --record-recovery (one token: the JSON never reads as an option)."""
    if recovery is None:
        return []
    return [f"--record-recovery={json.dumps(recovery.to_json(), separators=(',', ':'))}"]


def _refuse(answer: LaunchAnswer, run_id: str, host: str, stderr: str) -> None:
    """The launcher's refusal as orch's error (one line, the documented exit code)."""
    if answer.error == "busy":
        raise BusyError(f"{answer.message} on {host}; wait for it, `orch stop` it, or pass --force to start another "
                        "beside it")
    if answer.error == "exists":
        raise ConfigError(f"run {run_id} already exists on {host}; choose another --run-id")
    if answer.error == "missing":
        raise ConfigError(f"no run {run_id} on {host}; `orch runs` lists them")
    if answer.error == "broken":
        raise RemoteError(f"{answer.message} on {host}")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    raise RemoteError(f"launching the trainer failed on {host}: {lines[-1] if lines else 'no answer'}")


def wait_started(m: Machine, run_dir: str, pid: int, launched_at: float, timeout: float = START_TIMEOUT) -> None:
    """Succeed once the new trainer wrote status.json and has not failed; else show the log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        check = m.answer(verbs.STARTED, run_dir, pid, repr(launched_at))
        if check.state in (layout.RUNNING, layout.FINISHED, layout.STOPPED, layout.INTERRUPTED):
            return
        if check.state == layout.FAILED or not check.alive or time.monotonic() > deadline:
            why = "failed" if check.state == layout.FAILED else "exited" if not check.alive else "wrote no status.json"
            last = [line for line in check.log_tail if line.strip()][-3:]
            raise RemoteError(f"the trainer {why} right after launch; last lines of train.log: " + " | ".join(last))
        time.sleep(0.5)


def prepare(m: Machine, *, allow_cpu: bool, gpu: int | None = None) -> TrainingPython:
    """Setup and preflight: the training Python (managed env built if needed, remote.setup
    run), then the machine's checks (``gpu``: that GPU is one of its). Nothing of a run exists yet."""
    python = ensure_env(m)
    run_setup(m, python)
    require_ready(m, python.python, allow_cpu=allow_cpu, gpu=gpu)
    return python


@contextmanager
def working(ctx: Context) -> Iterator[Machine]:
    """The machine for a command that launches: started if stopped (and stopped again if the
    command fails before launching: orchestrator/provision.py), and held busy (autostop waits)
    while orch works there."""
    with acquire(ctx, start=True) as m, m.busy():
        yield m


def _refuse_if_busy(m: Machine, force: bool, except_run: str | None = None) -> None:
    """Say at once that the machine is busy (before syncing and installing); the launch
    checks again, atomically."""
    active = [r.run_id for r in m.runs() if r.active and r.run_id != except_run]
    if active and not force:
        raise BusyError(f"run {', '.join(active)} is still running on {m.remote.host}; wait for it, `orch stop` it, "
                        "or pass --force to start another beside it")


def deploy(ctx: Context, *, run_id: str | None = None, with_data: bool = False,
           launching: LaunchOptions = LaunchOptions(), trainer_args: Sequence[str] = ()) -> Launched:
    """The whole of ``orch deploy`` over one connection: provision, sync, setup, preflight, launch."""
    run_id = check_run_id(run_id) if run_id else new_run_id()
    argv = trainer_argv(ctx.cfg, trainer_args)
    stop_plan = autostop_plan(ctx.cfg, launching.autostop)
    _refuse_stored(ctx, run_id)
    with working(ctx) as m:
        _refuse_if_busy(m, launching.beside_others)
        if m.spot and ctx.cfg.storage is None:
            m.log(f"{m.remote.host} is a spot instance and runs have no storage mirror: when EC2 takes it back (or a "
                  "one-time spot instance shuts down), the run lives only on its disk; set storage.s3_uri")
        data = sync_data(m) if with_data else None
        python = prepare(m, allow_cpu=launching.allow_cpu, gpu=launching.gpu)
        answer = launch(m, Start(run_id, argv, python.python, True, launching.force, stop_plan, gpu=launching.gpu))
        return Launched(run_id, m.run_dir(run_id), m.remote.host, answer.pid or 0, m.code.version,
                        m.code.transferred, data, extra={"env": _env_json(python)} | _autostop_json(answer.autostop),
                        **_on(m))


def resume(ctx: Context, run_id: str | None = None, *, extension: Extension = Extension(), in_place: bool = False,
           launching: LaunchOptions = LaunchOptions(), with_data: bool = False,
           recovery: Recovery | Callable[[Machine], Recovery] | None = None) -> Launched:
    """Extend a finished run from its best checkpoint as a new run (default: the best
    finished run), or with ``in_place`` continue a killed/stopped run from its last epoch;
    ``recovery`` (with ``in_place``; or made from the machine it continues on) is recorded in
    the run by its trainer before it continues. ``with_data``: sync data.local_dir first (a
    recovery onto a new instance)."""
    if recovery is not None and not in_place:
        raise ConfigError("a recovery is recorded in the run it continues: only with --continue (in_place)")
    if in_place and extension.given():
        raise ConfigError("--continue keeps the run's own settings: --epochs, --learning-rate and --warmup-epochs "
                          "are for an extended run (`orch resume RUN` without --continue)")
    argv = trainer_argv(ctx.cfg, overrides=extension.given(), extending=True)
    stop_plan = autostop_plan(ctx.cfg, launching.autostop)
    force = launching.beside_others
    with working(ctx) as m:
        if in_place:
            target, fresh = _continued(m, run_id, force)
            argv, extra = [], {}
        else:
            parent = _parent(m, run_id, force)
            argv = ["--init-from", m.run_dir(parent.run_id), *argv]
            target, fresh, extra = new_run_id(), True, {"parent": parent.run_id}
        data = sync_data(m) if with_data else None
        python = prepare(m, allow_cpu=launching.allow_cpu, gpu=launching.gpu)
        record = recovery(m) if callable(recovery) else recovery
        if record is not None:
            extra["recovery"] = record
        answer = launch(m, Start(target, argv, python.python, fresh, launching.force, stop_plan, recovery=record,
                                 gpu=launching.gpu))
        return Launched(target, m.run_dir(target), m.remote.host, answer.pid or 0, m.code.version,
                        m.code.transferred, data,
                        extra=extra | {"env": _env_json(python)} | _autostop_json(answer.autostop), **_on(m))


def _continued(m: Machine, run_id: str | None, force: bool) -> tuple[str, bool]:
    """The run `resume --continue` restarts in place: killed or stopped, not finished; and
    whether its folder is new here (a run the machine lacks is restored from storage by the trainer)."""
    try:
        run = m.choose(run_id)
    except NoSuchRun:
        store = storage.storage(m.cfg)
        if store is None:
            raise
        return _restored(m, store, run_id, force), True
    if run.state == layout.FINISHED:
        raise ConfigError(f"run {run.run_id} is finished; extend it with `orch resume {run.run_id}`")
    if run.alive:
        raise BusyError(f"run {run.run_id} is still running; nothing to continue")
    _refuse_if_busy(m, force, except_run=run.run_id)
    return run.run_id, False


def _refuse_stored(ctx: Context, run_id: str) -> None:
    """A new run never takes the id of one the storage mirror holds (its trainer would restore
    and continue that run instead)."""
    store = storage.storage(ctx.cfg)
    if store is not None and store.objects(run_id):
        raise ConfigError(f"run {run_id} already exists in {store.uri}; choose another --run-id (or `orch resume "
                          f"{run_id} --continue`)")


def _restored(m: Machine, store: storage.Storage, run_id: str | None, force: bool) -> str:
    """A run only the storage mirror holds, to continue on this machine."""
    run = store.choose(run_id)
    if run.state == layout.FINISHED:
        raise ConfigError(f"run {run.run_id} is finished; extend it with `orch resume {run.run_id}`")
    if layout.STATE not in store.objects(run.run_id):
        raise ConfigError(f"run {run.run_id} has no committed epoch in {store.uri}: there is nothing to continue")
    _refuse_if_busy(m, force)
    m.log(f"run {run.run_id} is not on {m.remote.host}: the trainer restores it from {store.uri} (verified) first")
    if run.state == layout.RUNNING:
        m.log(f"its last mirrored state says running: make sure its old machine is gone (two trainers would both "
              f"write {store.uri} for run {run.run_id})")
    return run.run_id


def _parent(m: Machine, run_id: str | None, force: bool) -> RunInfo:
    """The finished run an extension starts from (default: the best)."""
    parent = m.choose(run_id, best=True)
    if parent.state != layout.FINISHED:
        raise ConfigError(f"run {parent.run_id} is {parent.shown_state}, not finished; continue it with "
                          f"`orch resume {parent.run_id} --continue`")
    _refuse_if_busy(m, force)
    m.log(f"extending run {parent.run_id} (best val_accuracy {accuracy_text(parent.best_val_accuracy)})")
    return parent


def _on(m: Machine) -> dict[str, Any]:
    """Launched's fields for the instance the run went to."""
    return {"instance_id": m.instance.instance_id if m.instance is not None else None, "created": m.created}


def _autostop_json(state: Autostop | None) -> dict[str, Any]:
    return {} if state is None else {"autostop": asdict(state)}


def _env_json(python: TrainingPython) -> dict[str, Any]:
    return {"python": python.python, "managed": python.managed, "built": python.built}
