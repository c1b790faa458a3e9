"""Setup: the Python that trains on the machine. An explicit ``remote.python`` is used as it
is; otherwise (ssh/ec2 targets by default) orch builds and reuses a virtualenv there with
trainer/envsetup.py, showing pip's progress; ``remote.setup`` runs after it, in the code
folder beside requirements.txt, with the env's bin/ first on PATH."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.errors import RemoteError
from orchestrator.machine import Machine
from orchestrator.remote import q
from trainer.codeversion import code_files

Log = Callable[[str], None]
ENVS_DIR = "envs"
SETUP_LOG = "setup.log"
_SETUP_DONE = ".setup-done"


@dataclass(frozen=True)
class TrainingPython:
    python: str
    managed: bool  # a virtualenv orch built
    built: bool = False  # ... by this command (False: reused, or not managed)
    gpus: int = 0  # as nvidia-smi listed them when the env was made


def ensure_env(m: Machine, log: Log) -> TrainingPython:
    """The interpreter that trains: remote.python, orch's managed env (built if missing), or
    the helper Python (env mode off / target local)."""
    cfg = m.cfg
    if not cfg.managed_env:
        return TrainingPython(cfg.remote.python or cfg.helper_python, managed=False)
    answer: dict = {}

    def on_line(line: str) -> None:
        kind, _, text = line.partition(": ")
        if kind == "orch-progress":
            log(f"env: {text}")
        elif kind == "orch-result":
            answer.update(json.loads(text))

    result = m.ask("trainer.envsetup", *_envsetup_args(m), check=False, on_line=on_line)
    if "python" not in answer:
        tail = " | ".join(answer.get("log_tail") or []) or result.stderr.strip()[-300:]
        where = f" (log: {answer['log']} on the machine)" if answer.get("log") else ""
        raise RemoteError(f"the managed environment could not be built on {m.remote.host}: "
                          f"{answer.get('error', 'no answer')}{where}; {tail}")
    if answer["built"]:
        log(f"env: ready at {answer['python']}")
    return TrainingPython(answer["python"], managed=True, built=bool(answer["built"]), gpus=int(answer.get("gpus", 0)))


def existing_python(m: Machine) -> str | None:
    """The training interpreter if it is there already (builds nothing: orch doctor)."""
    if not m.cfg.managed_env:
        return m.cfg.remote.python or m.cfg.helper_python
    out = m.ask("trainer.envsetup", *_envsetup_args(m), "--check", check=False).stdout
    lines = [line for line in out.splitlines() if line.startswith("orch-result: ")]
    return json.loads(lines[-1].partition(": ")[2]).get("python") if lines else None


def _envsetup_args(m: Machine) -> list[str]:
    env = m.cfg.remote.env
    return [f"{m.root}/{ENVS_DIR}", "--requirements", code_files()["trainer/requirements.txt"].decode(),
            *(["--packages-from", env.packages_from] if env.packages_from else []),
            *(["--index-url", env.index_url] if env.index_url else []),
            *(f"--pip-arg={arg}" for arg in env.pip_args)]


def run_setup(m: Machine, python: TrainingPython, log: Log) -> None:
    """remote.setup, once per code version, in the code folder (requirements.txt is there),
    with the training Python's bin/ first on PATH (so `pip install ...` installs into the env)."""
    setup = m.cfg.remote.setup
    code = m.code.path
    if not setup or m.remote.run(f"test -e {q(code + '/' + _SETUP_DONE)}", check=False).code == 0:
        return
    log(f"running remote.setup for code version {m.code.version}")
    bin_dir = python.python.rsplit("/", 1)[0] if "/" in python.python else None
    path = f'PATH={q(bin_dir)}:"$PATH" ' if bin_dir else ""
    # remote.setup is the user's own shell command: it is run as written, on purpose.
    result = m.remote.run(f"cd {q(code)} && export {path}ORCH_PYTHON={q(python.python)} && ( {setup} ) "
                          f"> {SETUP_LOG} 2>&1 && touch {_SETUP_DONE}", check=False)
    if result.code != 0:
        tail = m.remote.run(f"tail -n 5 {q(code + '/' + SETUP_LOG)}", check=False).stdout.strip()
        raise RemoteError(f"remote.setup failed (exit {result.code}); last lines of "
                          f"{code}/{SETUP_LOG}: {' | '.join(tail.splitlines())}")

