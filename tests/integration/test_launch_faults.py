"""Whatever fails after a launch: autostop was armed with it (money), and the error names the
run that was started and how to follow or stop it. An interpreter wrapper that runs Python as
its child (as `conda run` does) launches fine: the trainer's own pid is waited for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.context import Context
from orchestrator.deploy import deploy
from orchestrator.errors import ConnectionLost
from orchestrator.machine import Machine
from orchestrator.requests import LaunchOptions
from tests.integration.conftest import run_orch, write_config
from tests.integration.trainer_proc import ROOT
from trainer.contract import layout, verbs
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
TINY = {"epochs": 1, "batch_size": 8, "hidden": 8, "attention": 4, "seed": 1, "patience": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("launch-data")
    synth(root, n=60, dim=8, seed=4, min_frames=4, max_frames=6)
    return root


def config(tmp_path: Path, data: Path, python: str = sys.executable) -> Path:
    return write_config(tmp_path / "deploy.yaml", target="local",
                        remote={"root": str(tmp_path / "remote"), "python": python},
                        data={"remote_dir": str(data)}, train={**TINY, "cache_dir": str(tmp_path / "cache")},
                        autostop={"idle_minutes": 30, "command": f"touch {tmp_path / 'STOPPED'}"})


def test_a_connection_lost_right_after_the_launch_names_the_run_and_autostop_is_armed(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Machine.answer

    def answer(self: Machine, verb: verbs.Verb, *args: object, **kwargs: object) -> object:
        if verb == verbs.STARTED:
            raise ConnectionLost("the connection to localhost was lost during a command")
        return original(self, verb, *args, **kwargs)

    monkeypatch.setattr(Machine, "answer", answer)
    ctx = Context(load_config(config(tmp_path, data)))
    with pytest.raises(ConnectionLost) as lost:
        deploy(ctx, run_id="cut-off", launching=LaunchOptions())
    message = str(lost.value)
    assert "run cut-off was launched on localhost" in message and "orch monitor cut-off" in message
    assert "orch stop cut-off" in message and lost.value.exit_code == 4
    setting = json.loads((tmp_path / "remote" / layout.AUTOSTOP_SETTING).read_text())
    assert setting["idle_minutes"] == 30  # armed in the launch itself
    monkeypatch.setattr(Machine, "answer", original)
    run_orch("deploy", "-c", config(tmp_path, data), "--autostop", "off", "--run-id", "cleanup")


def test_an_interpreter_wrapper_that_runs_python_as_its_child_launches(tmp_path: Path, data: Path) -> None:
    wrapper = tmp_path / "wrapped-python"
    wrapper.write_text(f"#!/bin/sh\n{sys.executable} \"$@\"\nexit $?\n")  # no exec: the trainer is its child
    wrapper.chmod(0o755)
    cfg = config(tmp_path, data, python=str(wrapper))
    proc = run_orch("deploy", "--json", "--follow", "--autostop", "off", "-c", cfg, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    launched = json.loads(proc.stdout[: proc.stdout.index("\n}") + 2])
    status = json.loads((Path(launched["run_dir"]) / layout.STATUS).read_text())
    assert status["state"] == "finished" and status["pid"] != launched["pid"]  # the wrapper's pid was launched
