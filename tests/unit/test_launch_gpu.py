"""The launch's busy check with GPUs (trainer/machine/launch.py): a run on one GPU (--gpu K)
shares the machine with runs on its other GPUs, never with one on the same GPU or one on every
GPU; the trainer sees its GPU alone."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.trainer_proc import ROOT
from trainer.contract import layout
from trainer.machine import launch
from trainer.machine.proc import pid_line


@pytest.fixture
def training(tmp_path: Path) -> Iterator[Callable[[str, int | None], None]]:
    """Make a run under tmp_path that trains (a live process, state running), on ``gpu`` or all."""
    sleepers: list[subprocess.Popen[bytes]] = []

    def make(run_id: str, gpu: int | None) -> None:
        run = tmp_path / layout.RUNS_DIR / run_id
        run.mkdir(parents=True)
        sleepers.append(subprocess.Popen(["sleep", "60"]))
        (run / layout.PID_FILE).write_text(pid_line(sleepers[-1].pid))
        (run / layout.STATUS).write_text(json.dumps({"state": "running"}))
        if gpu is not None:
            (run / layout.GPU_FILE).write_text(str(gpu))

    yield make
    for s in sleepers:
        s.kill()
        s.wait()


def refused(root: Path, gpu: int | None) -> str | None:
    try:
        launch._check(root, root / layout.RUNS_DIR / "new", True, False, gpu)
    except launch.Refused as exc:
        return str(exc)
    return None


def test_a_run_on_one_gpu_shares_the_machine_with_runs_on_the_others_only(tmp_path: Path, training: Callable) -> None:
    training("on-0", 0)
    assert refused(tmp_path, 0) == "run on-0 is still running"
    assert refused(tmp_path, 1) is None
    assert refused(tmp_path, None) == "run on-0 is still running"  # a run on every GPU waits for every run
    training("everywhere", None)
    assert refused(tmp_path, 1) == "run everywhere is still running"


def test_the_trainer_sees_its_gpu_alone_and_the_run_records_it(tmp_path: Path) -> None:
    # The "interpreter" writes what it was given to see; the launch is otherwise the real one.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "${{CUDA_VISIBLE_DEVICES-all}}" > {tmp_path}/seen\n')
    python.chmod(0o755)
    run = tmp_path / layout.RUNS_DIR / "run"
    run.mkdir(parents=True)

    def seen(*gpu: str) -> str:
        (tmp_path / "seen").unlink(missing_ok=True)
        answer, code = launch.launch([str(tmp_path), "run", "--continue", *gpu, "--python", str(python), "--code",
                                      str(ROOT), "--data-dir", str(tmp_path)])
        assert code == 0 and answer.pid is not None, answer
        while not (tmp_path / "seen").is_file() or not (tmp_path / "seen").read_text().endswith("\n"):
            time.sleep(0.05)  # the "trainer" writes it once it runs
        return (tmp_path / "seen").read_text().strip()

    assert seen("--gpu", "1") == "1" and (run / layout.GPU_FILE).read_text() == "1"
    assert seen() == "1"  # continued without --gpu: on the GPU it was launched on
    assert seen("--gpu", "0") == "0" and (run / layout.GPU_FILE).read_text() == "0"  # or on the one given
