"""``orch deploy`` and ``orch resume``, SkyPilot-style steps over one connection: provision
(start the instance) -> sync code (and data) -> setup (the managed env, remote.setup) ->
preflight (can this machine train?) -> launch the trainer detached, atomically -> verify it
started."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from orchestrator.autostop import apply as apply_autostop
from orchestrator.autostop import plan as autostop_plan
from orchestrator.config import DeployConfig
from orchestrator.environment import TrainingPython, ensure_env, run_setup
from orchestrator.errors import BusyError, ConfigError, RemoteError
from orchestrator.machine import Machine, connect
from orchestrator.preflight import require_ready
from orchestrator.remote import Remote, q
from orchestrator.sync import DataSync, sync_data
from trainer import layout, options
from trainer.wire import Autostop

Log = Callable[[str], None]
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
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

    def to_json(self) -> dict[str, Any]:
        d = {"run_id": self.run_id, "run_dir": self.run_dir, "host": self.host, "pid": self.pid,
             "code_version": self.code_version, "code_transferred": self.code_transferred}
        if self.data is not None:
            d["data"] = {"files": self.data.files, "bytes": self.data.bytes, "method": self.data.method,
                         "skipped": self.data.skipped}
        return d | self.extra


def new_run_id() -> str:
    """Sorts by time, safe in a shell and a path: 20261121-103015-a3f9."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' only "
                          "(it names a folder on the machine)")
    return run_id


def trainer_argv(cfg: DeployConfig, extra: Sequence[str] = (), overrides: dict[str, Any] | None = None,
                 *, extending: bool = False) -> list[str]:
    """The trainer's options for a run: deploy.yaml's `train:` keys, then ``overrides``, then
    the arguments after `--`; checked against the trainer's own options table before anything
    connects. An extended run takes only the keys its recipe does not decide (options.GIVEN)."""
    given = cfg.train_given()
    if extending:
        given = {k: v for k, v in given.items() if options.BY_NAME[k].on_extend == options.GIVEN}
    argv = options.to_argv(given | {k: v for k, v in (overrides or {}).items() if v is not None}) + list(extra)
    for flag in ("--data-dir", "--run-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ConfigError(f"{flag}: set by orch (data.remote_dir and the run), not after `--`")
    try:
        options.parse_argv(argv, reserved={"init_from": "set by `orch resume`, not after `--`"})
    except options.ArgvError as exc:
        raise ConfigError(f"trainer options: {exc} (`python -m trainer train --help` lists them)") from exc
    return argv


def launch(m: Machine, run_id: str, options: Sequence[str], *, python: str, force: bool, fresh: bool,
           log: Log) -> int:
    """Start ``python -m trainer train`` detached (it outlives the SSH session); its pid.

    ONE remote command (trainer/launch.py) does the busy check, creates the run folder and
    starts the trainer under the machine's launch lock: of two launches at the same moment,
    exactly one starts and the other gets the busy error. ``fresh``: a new run (its folder
    must not exist); else the run folder is continued.
    """
    remote, run_dir = m.remote, m.run_dir(run_id)
    resolved = m.cfg.model_dump(mode="json") | {"resolved": {"root": m.root, "code": m.code.path}}
    argv = [m.cfg.helper_python, "-m", "trainer.launch", m.root, run_id, "--fresh" if fresh else "--continue",
            *(["--force"] if force else []), "--python", python, "--code", m.code.path,
            "--data-dir", remote.expand(m.cfg.remote_data_dir), "--", *options]
    result = remote.run(f"PYTHONPATH={q(m.code.path)} " + " ".join(q(a) for a in argv), check=False,
                        write=lambda fh: fh.write(json.dumps(resolved, indent=2).encode()) if fresh else None,
                        what="launching the trainer")
    answer = _launch_answer(result.stdout)
    if "pid" not in answer:
        _refuse(answer, run_id, remote.host, result.stderr)
    pid = int(answer["pid"])
    log(f"launched run {run_id} (pid {pid}) on {remote.host}")
    wait_started(remote, run_dir, pid)
    return pid


def _launch_answer(stdout: str) -> dict[str, Any]:
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def _refuse(answer: dict[str, Any], run_id: str, host: str, stderr: str) -> None:
    """The launcher's refusal as orch's error (one line, the documented exit code)."""
    kind, message = answer.get("error"), answer.get("message", "")
    if kind == "busy":
        raise BusyError(f"{message} on {host}; wait for it, `orch stop` it, or pass --force to start another "
                        "beside it")
    if kind == "exists":
        raise ConfigError(f"run {run_id} already exists on {host}; choose another --run-id")
    if kind == "missing":
        raise ConfigError(f"no run {run_id} on {host}; `orch runs` lists them")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    raise RemoteError(f"launching the trainer failed on {host}: {lines[-1] if lines else 'no answer'}")


def wait_started(remote: Remote, run_dir: str, pid: int, timeout: float = START_TIMEOUT) -> None:
    """Succeed once the new process (``pid``) wrote status.json and has not failed; else show
    the log's tail. (A continued run's folder holds the status of the previous process.)"""
    status = f"{run_dir}/{layout.STATUS}"
    check = (f"cat {q(status)} 2>/dev/null || echo '{{}}'; echo; "
             f"kill -0 {pid} 2>/dev/null && echo ALIVE || echo GONE")
    deadline = time.monotonic() + timeout
    while True:
        out = remote.run(check, what="checking the run").stdout.strip().splitlines()
        alive = out[-1] == "ALIVE"
        try:
            status_doc = json.loads("\n".join(out[:-1]) or "{}")
        except ValueError:
            status_doc = {}  # caught mid-rename: look again
        state = status_doc.get("state") if status_doc.get("pid") == pid else None
        if state in (layout.RUNNING, layout.FINISHED, layout.STOPPED):
            return
        if state == layout.FAILED or not alive or time.monotonic() > deadline:
            tail = remote.run(f"tail -n 15 {q(run_dir + '/' + layout.TRAIN_LOG)}", check=False).stdout
            why = "failed" if state == layout.FAILED else "exited" if not alive else "wrote no status.json"
            last = [line for line in tail.splitlines() if line.strip()][-3:]
            raise RemoteError(f"the trainer {why} right after launch; last lines of train.log: "
                              + " | ".join(last))
        time.sleep(0.5)


def prepare(m: Machine, *, allow_cpu: bool, log: Log) -> TrainingPython:
    """Setup and preflight: the training Python (managed env built if needed, remote.setup
    run), then the machine's checks. Nothing of a run exists yet."""
    python = ensure_env(m, log)
    run_setup(m, python, log)
    require_ready(m, python.python, allow_cpu=allow_cpu)
    return python


def deploy(cfg: DeployConfig, *, run_id: str | None = None, with_data: bool = False, force: bool = False,
           allow_cpu: bool = False, autostop: str | None = None, trainer_args: Sequence[str] = (),
           trust_new_host: bool = False, log: Log = lambda _m: None) -> Launched:
    """The whole of ``orch deploy`` over one connection: provision, sync, setup, preflight, launch."""
    run_id = check_run_id(run_id) if run_id else new_run_id()
    argv = trainer_argv(cfg, trainer_args)
    stop_plan = autostop_plan(cfg, autostop)
    with connect(cfg, trust_new_host=trust_new_host, start=True, log=log) as m:
        data = sync_data(m.remote, cfg, log) if with_data else None
        python = prepare(m, allow_cpu=allow_cpu, log=log)
        pid = launch(m, run_id, argv, python=python.python, force=force, fresh=True, log=log)
        armed = apply_autostop(m, stop_plan, log)
        return Launched(run_id, m.run_dir(run_id), m.remote.host, pid, m.code.version, m.code.transferred, data,
                        extra={"env": _env_json(python)} | _autostop_json(armed))


def resume(cfg: DeployConfig, run_id: str | None = None, *, epochs: int | None = None,
           learning_rate: float | None = None, warmup_epochs: int | None = None, in_place: bool = False,
           force: bool = False, allow_cpu: bool = False, autostop: str | None = None,
           trust_new_host: bool = False, log: Log = lambda _m: None) -> Launched:
    """Extend a finished run from its best checkpoint as a new run (default: the best
    finished run), or with ``in_place`` continue a killed/stopped run from its last epoch."""
    overrides = {"epochs": epochs, "learning_rate": learning_rate, "warmup_epochs": warmup_epochs}
    argv = trainer_argv(cfg, overrides=overrides, extending=True)
    stop_plan = autostop_plan(cfg, autostop)
    with connect(cfg, trust_new_host=trust_new_host, start=True, log=log) as m:
        if in_place:
            run = m.choose(run_id)
            if run.state == layout.FINISHED:
                raise ConfigError(f"run {run.run_id} is finished; extend it with `orch resume {run.run_id}`")
            if run.alive:
                raise BusyError(f"run {run.run_id} is still running; nothing to continue")
            target, argv, fresh, extra = run.run_id, [], False, {}
        else:
            parent = m.choose(run_id, best=True)
            if parent.state != layout.FINISHED:
                raise ConfigError(f"run {parent.run_id} is {parent.shown_state}, not finished; continue it with "
                                  f"`orch resume {parent.run_id} --continue`")
            argv = ["--init-from", m.run_dir(parent.run_id), *argv]
            target, fresh, extra = new_run_id(), True, {"parent": parent.run_id}
            log(f"extending run {parent.run_id} (best val_accuracy {parent.best_val_accuracy:.4f})")
        python = prepare(m, allow_cpu=allow_cpu, log=log)
        pid = launch(m, target, argv, python=python.python, force=force, fresh=fresh, log=log)
        armed = apply_autostop(m, stop_plan, log)
        return Launched(target, m.run_dir(target), m.remote.host, pid, m.code.version, m.code.transferred,
                        extra=extra | {"env": _env_json(python)} | _autostop_json(armed))


def _autostop_json(state: Autostop | None) -> dict[str, Any]:
    return {} if state is None else {"autostop": asdict(state)}


def _env_json(python: TrainingPython) -> dict[str, Any]:
    return {"python": python.python, "managed": python.managed, "built": python.built}
