"""What crosses between the halves is declared once: the options table, the wire records, the
code version, the exit codes. These tests fail when a second declaration creeps in."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from trainer.contract import options
from trainer.contract.exitcodes import MEANINGS, ExitCode
from trainer.ml.config import Architecture, TrainConfig


def test_train_config_is_the_options_table() -> None:
    # the storage group is where the run is mirrored, not how it trains (trainer/ml/mirror.Settings);
    # the recovery group is what happened to it (trainer/ml/runstate.RunState.recoveries)
    training = [o for o in options.OPTIONS if o.group not in options.NOT_TRAINING]
    assert {o.name for o in options.OPTIONS if o.group == "storage"} == {"mirror_uri", "mirror_endpoint_url",
                                                                         "mirror_region"}
    assert {o.name for o in options.OPTIONS if o.group == "recovery"} == {"record_recovery"}
    table = {o.name for o in training}
    config = {f.name for f in fields(TrainConfig)} - {"data_dir", "run_dir", "architecture", "parent_run",
                                                      "parent_best_val_accuracy", "parent_step"}
    assert config | {f.name for f in fields(Architecture)} == table
    cfg = TrainConfig(data_dir="d", run_dir="r")
    for option in training:  # every default comes from the table
        assert cfg.option(option.name) == option.default, option.name


def test_trainer_argparse_is_the_options_table(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.ml.cli import main

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for option in options.OPTIONS:
        assert option.flag in text and option.help.split()[0] in text
    assert "--no-cache" in text and "--no-class-weights" in text


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-3"], "argument --epochs: must be an integer >= 1"),
    (["--epochs", "ten"], "argument --epochs: must be an integer >= 1 and <= 1000000, got 'ten'"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no prefix matching
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--learning-rate", "-0.001"], "argument --learning-rate: must be a number > 0"),
    (["--val-fraction", "1"], "argument --val-fraction: must be a number > 0 and < 1"),
    (["--dropout", "1.5"], "argument --dropout: must be a number >= 0 and < 1"),
    (["--split", "speakers"], "argument --split: must be one of speaker, random"),
    (["--classes", "happy"], "argument --classes: give at least two distinct class names"),
])
def test_out_of_range_options_are_usage_errors_before_anything_is_written(
        argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.ml.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path), "--run-dir", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"trainer: error: {message}"), err
    assert not run.exists()


def test_booleans_round_trip() -> None:
    for value in (True, False):
        values = {o.name: value for o in options.OPTIONS if o.type is bool}
        assert options.parse_argv(options.to_argv(values)) == values


def test_wire_records_round_trip_through_json() -> None:
    from trainer.contract.wire import Epoch, GpuRow, Host, HostLoad, RunInfo, Snapshot

    snap = Snapshot(RunInfo("r1", created=1.0, state="running", phase="training", epoch=3, epochs=10, val_accuracy=0.5,
                            best_val_accuracy=0.6, best_epoch=2, updated_at="t", parent="p0",
                            parent_best_val_accuracy=0.55, vs_parent=0.05, beat_parent=True, started_at="s", pid=123,
                            alive=True, quiet_for=3.0, stall_after=600.0),
                    [Epoch(3, 1.5, 0.4, 1.6, 0.5, 1e-3, 2.0)], 3, ["line"],
                    Host([GpuRow(0, "A10G", 97.0, 1.0, 2.0, 70.0, 200.0)], None, HostLoad(4, [0.1], 8, 4)))
    assert Snapshot.from_json(json.loads(json.dumps(snap.to_json()))) == snap
    # a probe of another version: unknown keys ignored, missing ones default
    assert RunInfo.from_json({"run_id": "x", "future_field": 1}) == RunInfo("x")


@pytest.mark.parametrize("state, alive, launching, shown, active", [
    ("running", True, False, "running", True), ("running", False, False, "died", False),
    (None, False, False, "died", False), (None, False, True, None, False), (None, True, False, None, True),
    ("finished", False, False, "finished", False), ("finished", True, False, "finished", False),
    ("stopped", False, False, "stopped", False),
])
def test_shown_state(state: str | None, alive: bool, launching: bool, shown: str | None, active: bool) -> None:
    from trainer.contract.wire import RunInfo

    run = RunInfo("r", state=state, alive=alive, launching=launching)
    assert run.shown_state == shown and run.active == active


def test_one_code_version_for_the_bundle_and_the_trainer(tmp_path: Path) -> None:
    from orchestrator.sync import code_bundle

    bundle = code_bundle()
    unpacked = tmp_path / "code"
    unpacked.mkdir()
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(bundle.tar_gz())) as tar:
        tar.extractall(unpacked, filter="data")
    # what the trainer computes on the machine, from the files it was sent (caches and all)
    (unpacked / "trainer" / "__pycache__").mkdir()
    (unpacked / "trainer" / "__pycache__" / "x.pyc").write_bytes(b"cache")
    out = subprocess.run([sys.executable, "-c", "from trainer.contract.codeversion import code_version; print(code_version())"],
                         cwd=unpacked, capture_output=True, text=True, check=True, env={"PYTHONPATH": str(unpacked)})
    assert out.stdout.strip() == bundle.version


def test_the_probe_runs_from_what_is_sent_with_the_question(tmp_path: Path) -> None:
    """Read-only commands upload nothing: the probe's modules travel on stdin."""
    from tests.conftest import local_machine

    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "status.json").write_text('{"state": "finished", "best_val_accuracy": 0.5}')
    # a working directory without the trainer package: nothing to import from but stdin
    m = local_machine(tmp_path)
    runs = m.runs()
    assert [(r.run_id, r.state, r.best_val_accuracy, r.shown_state) for r in runs] == [("r1", "finished", 0.5, "finished")]
    assert not (tmp_path / "code").exists()
    assert m.host_report().load.cpus


def test_exit_codes_mean_one_thing() -> None:
    assert set(MEANINGS) == set(ExitCode)
    assert len({meaning for meaning, _ in MEANINGS.values()}) == len(MEANINGS)


@pytest.mark.parametrize("answer", [
    {"run_id": "a", "created": 10**400},  # beyond any float
    {"run_id": "a", "epoch": "3", "val_accuracy": float("nan"), "best_val_accuracy": float("inf")},
    {"run_id": "a", "alive": 1, "pid": True, "state": ["running"]},
])
def test_a_crafted_field_defaults_and_never_raises(answer: dict) -> None:
    from trainer.contract.wire import RunInfo

    run = RunInfo.from_json(answer)
    assert run.run_id == "a" and run.created is None and run.epoch is None and run.val_accuracy is None
    assert run.alive is False and run.pid is None and run.state is None


def test_a_nested_record_that_is_not_one_leaves_its_field_at_the_default() -> None:
    from trainer.contract.wire import RunFiles, WireError

    files = RunFiles.from_json({"run": {"run_id": 5}, "files": {"a": 1, "b": -1, "c": 10**30, "d": "1"}})
    assert files.run is None and files.files == {"a": 1}
    with pytest.raises(WireError):
        RunFiles.from_json([])


def test_the_frame_reader_takes_the_first_answer_and_survives_crafted_lines() -> None:
    from orchestrator.machine import _FrameReader

    progress: list[str] = []
    reader = _FrameReader("F00", progress.append)
    for line in ("Welcome to the box", "F00 answer " + "[" * 100_000, 'noise F00 progress "working"',
                 'F00 answer {"home": "/home/u"}', 'F00 answer {"home": "/elsewhere"}', "F01 answer {}"):
        reader.line(line)
    assert reader.answer == {"home": "/home/u"} and progress == ["working"]
    assert reader.noise == ["Welcome to the box", "noise ", "F01 answer {}"]
