"""Setup: the Python that trains on the machine. An explicit ``remote.python`` is used as it
is; otherwise (ssh/ec2 targets by default) orch builds and reuses a virtualenv there
(trainer/machine/envsetup.py), showing pip's progress; ``remote.setup`` runs after it, once per
code version (trainer/machine/setup.py)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import DiskFull, NotReady, RemoteError
from orchestrator.machine import Machine
from trainer.contract import layout, verbs
from trainer.contract.codeversion import code_files
from trainer.contract.wire import EnvAnswer


@dataclass(frozen=True)
class TrainingPython:
    python: str
    managed: bool  # a virtualenv orch built
    built: bool = False  # ... by this command (False: reused, or not managed)
    gpus: int = 0  # as nvidia-smi listed them when the env was made


def ensure_env(m: Machine) -> TrainingPython:
    """The interpreter that trains: remote.python, orch's managed env (built if missing), or
    the helper Python (env mode off / target local)."""
    cfg = m.cfg
    if not cfg.managed_env:
        return TrainingPython(m.expand_user(cfg.remote.python or cfg.helper_python), managed=False)
    got = m.ask(verbs.ENV, *_envsetup_args(m), on_progress=lambda text: m.log(f"env: {text}"))
    answer = EnvAnswer.from_json(got.record) if isinstance(got.record, dict) else EnvAnswer()
    if answer.disk_full:
        raise DiskFull(f"no space left on device on {m.remote.host} while building the managed environment in "
                       f"{m.root}/{layout.ENVS_DIR}: free some space (df -h) and deploy again")
    if answer.python is None:
        tail = " | ".join(answer.log_tail) or got.result.stderr.strip()[-300:]
        where = f" (log: {answer.log} on the machine)" if answer.log else ""
        raise RemoteError(f"the managed environment could not be built on {m.remote.host}: "
                          f"{answer.error or 'no answer'}{where}; {tail}")
    if answer.built:
        m.log(f"env: ready at {answer.python}")
    return TrainingPython(answer.python, managed=True, built=answer.built, gpus=answer.gpus)


def existing_python(m: Machine) -> str | None:
    """The training interpreter if it is there already (builds nothing: orch doctor); None
    when the managed env is not built yet."""
    if not m.cfg.managed_env:
        return ensure_env(m).python
    got = m.ask(verbs.ENV, *_envsetup_args(m), "--check")
    if not isinstance(got.record, dict):
        why = (got.result.stderr.strip().splitlines() or [f"exit code {got.result.code}"])[-1]
        raise NotReady(f"remote.env.base_python {m.cfg.helper_python} cannot run on {m.remote.host}: {why}")
    return EnvAnswer.from_json(got.record).python


def _envsetup_args(m: Machine) -> list[str]:
    env = m.cfg.remote.env
    return [f"{m.root}/{layout.ENVS_DIR}", "--requirements", code_files()["trainer/requirements.txt"].decode(),
            *(["--packages-from", env.packages_from] if env.packages_from else []),
            *(["--index-url", env.index_url] if env.index_url else []),
            *(f"--pip-arg={arg}" for arg in env.pip_args)]


def run_setup(m: Machine, python: TrainingPython) -> None:
    """remote.setup, once per code version, in the code folder (requirements.txt is there),
    with the training Python's folder first on PATH (so `pip install ...` installs into the env);
    two deploys at once run it once, the second waits for the first."""
    setup = m.cfg.remote.setup
    if not setup:
        return
    result = m.answer(verbs.SETUP, m.code.path, python.python, setup)
    if result.ran:
        m.log(f"ran remote.setup for code version {m.code.version}")
    if result.code != 0:
        raise RemoteError(f"remote.setup failed (exit {result.code}); last lines of "
                          f"{m.code.path}/{layout.SETUP_LOG}: {' | '.join(result.log_tail)}")
