"""``orch deploy``: provision -> sync code (and data) -> check the machine is free -> launch
the trainer detached -> verify it started."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from orchestrator.config import DeployConfig
from orchestrator.errors import BusyError, ConfigError, RemoteError
from orchestrator.remote import Remote, q
from orchestrator.sync import CodeSync, DataSync, sync_code, sync_data
from orchestrator.target import open_remote
from trainer import layout

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
            d["data"] = {"files": self.data.files, "bytes": self.data.bytes, "method": self.data.method}
        return d | self.extra


def new_run_id() -> str:
    """Sorts by time, safe in a shell and a path: 20261121-103015-a3f9."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def check_run_id(run_id: str) -> str:
    if not RUN_ID.match(run_id):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' only "
                          "(it names a folder on the machine)")
    return run_id


def trainer_options(train: dict[str, Any], extra: Sequence[str]) -> list[str]:
    """deploy.yaml's `train:` mapping as trainer options, then the options after `--`."""
    options: list[str] = []
    for key, value in train.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            options.append(flag)
        elif value is False:
            options.append("--no-" + key.replace("_", "-"))
        else:
            options += [flag, str(value)]
    return options + list(extra)


def probe_runs(remote: Remote, cfg: DeployConfig, code: CodeSync | str) -> list[dict[str, Any]]:
    """Every run on the machine, with liveness, in one remote command."""
    code_path = code.path if isinstance(code, CodeSync) else code
    root = remote.expand(cfg.remote_root)
    out = remote.run(f"PYTHONPATH={q(code_path)} {q(cfg.remote_python)} -m trainer.probe {q(root)}",
                     what="listing runs").stdout
    return json.loads(out)["runs"]


def active_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r["state"] == layout.RUNNING and r["alive"]]


def launch(remote: Remote, cfg: DeployConfig, code: CodeSync, run_id: str, options: Sequence[str],
           *, force: bool, log: Log) -> tuple[str, int]:
    """Start ``python -m trainer train`` detached (it survives the SSH session); (run dir, pid)."""
    busy = active_runs(probe_runs(remote, cfg, code))
    if busy and not force:
        ids = ", ".join(r["run_id"] for r in busy)
        raise BusyError(f"run {ids} is still running on {remote.host}; wait for it, `orch stop` it, "
                        "or pass --force to start another beside it")
    root = remote.expand(cfg.remote_root)
    run_dir = layout.run_dir(root, run_id)
    if remote.run(f"test -e {q(run_dir)}", check=False).code == 0:
        raise ConfigError(f"run {run_id} already exists on {remote.host}; choose another --run-id")
    resolved = cfg.model_dump(mode="json") | {"resolved": {"root": root, "code": code.path}}
    remote.run(f"mkdir -p {q(run_dir)} && cat > {q(run_dir + '/' + layout.DEPLOY_JSON)}",
               write=lambda fh: fh.write(json.dumps(resolved, indent=2).encode()), what="creating the run")
    argv = [cfg.remote_python, "-m", "trainer", "train", "--data-dir", remote.expand(cfg.remote_data_dir),
            "--run-dir", run_dir, *options]
    log_path = f"{run_dir}/{layout.TRAIN_LOG}"
    # setsid + nohup + redirections: the process owns nothing of this SSH session. The `cd`
    # is a statement of its own: `cd X && cmd &` would background a shell that keeps the
    # session's stdout open (bash does not exec the last command) until training ends.
    command = (f"cd {q(run_dir)} || exit 1; PYTHONPATH={q(code.path)} setsid nohup {' '.join(q(a) for a in argv)} "
               f"> {q(log_path)} 2>&1 < /dev/null & echo $!")
    pid = int(remote.run(command, what="launching the trainer").stdout.split()[-1])
    log(f"launched run {run_id} (pid {pid}) on {remote.host}")
    return run_dir, pid


def wait_started(remote: Remote, run_dir: str, pid: int, timeout: float = START_TIMEOUT) -> None:
    """Succeed once status.json exists and the run has not failed; else show the log's tail."""
    status = f"{run_dir}/{layout.STATUS}"
    check = (f"cat {q(status)} 2>/dev/null || echo '{{}}'; echo; "
             f"kill -0 {pid} 2>/dev/null && echo ALIVE || echo GONE")
    deadline = time.monotonic() + timeout
    while True:
        out = remote.run(check, what="checking the run").stdout.strip().splitlines()
        alive = out[-1] == "ALIVE"
        try:
            state = json.loads("\n".join(out[:-1]) or "{}").get("state")
        except ValueError:
            state = None  # caught mid-rename: look again
        if state in (layout.RUNNING, layout.FINISHED, layout.STOPPED):
            return
        if state == layout.FAILED or not alive or time.monotonic() > deadline:
            tail = remote.run(f"tail -n 15 {q(run_dir + '/' + layout.TRAIN_LOG)}", check=False).stdout
            why = "failed" if state == layout.FAILED else "exited" if not alive else "wrote no status.json"
            last = [line for line in tail.splitlines() if line.strip()][-3:]
            raise RemoteError(f"the trainer {why} right after launch; last lines of train.log: "
                              + " | ".join(last))
        time.sleep(0.5)


def deploy(cfg: DeployConfig, *, run_id: str | None = None, with_data: bool = False, force: bool = False,
           trainer_args: Sequence[str] = (), trust_new_host: bool = False, log: Log = lambda _m: None) -> Launched:
    """The whole of ``orch deploy`` over one connection."""
    run_id = check_run_id(run_id) if run_id else new_run_id()
    with open_remote(cfg, trust_new_host=trust_new_host, log=log) as remote:
        code = sync_code(remote, cfg, log)
        data = sync_data(remote, cfg, log) if with_data else None
        options = trainer_options(cfg.train, trainer_args)
        run_dir, pid = launch(remote, cfg, code, run_id, options, force=force, log=log)
        wait_started(remote, run_dir, pid)
        return Launched(run_id, run_dir, remote.host, pid, code.version, code.transferred, data)
