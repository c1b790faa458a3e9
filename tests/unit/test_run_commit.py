"""The run directory's commit point, derived files, repair, lock and failpoints (trainer/contract/layout.py),
with plain files standing in for weights: no TensorFlow, every failpoint, in-process."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.contract import layout
from trainer.contract.files import disk_full_error
from trainer.machine import faults
from trainer.machine.fsutil import atomic_write_json
from trainer.ml import runlock, runstate
from trainer.ml.config import TrainConfig
from trainer.ml.errors import RunBusy, TrainerError, UsageError
from trainer.ml.rundir import RunDir
from trainer.ml.runstate import Checkpoint, Position, RunState
from trainer.ml.tbevents import read_steps

ROOT = Path(__file__).resolve().parents[2]
ACCURACIES = [0.30, 0.25, 0.40, 0.40, 0.35, 0.50]  # best moves at epochs 1, 3, 6 (ties do not move it)
STOPPED_INSIDE = 2  # the epoch inside which a stop commits a position (batch 3)


class Crash(BaseException):
    """Stands in for a kill at a failpoint (a BaseException: nothing catches it on the way)."""


def _train(path: Path, accuracies: list[float] = ACCURACIES) -> RunDir:
    """What trainer.train does to a run directory, minus the model: start-up repair, inputs
    written once, one commit per epoch (and a position inside epoch STOPPED_INSIDE, as a
    stop commits it), evaluation outputs, the final publish."""
    run = RunDir(path, runstate.read(path) or runstate.initial(None, None))
    if (run.read_json(layout.STATUS) or {}).get("state") == layout.FINISHED:
        run.repair(None, final=True)
        return run
    run.create()
    run.repair(layout.RUNNING, phase="loading data", epochs=len(accuracies))
    for name in layout.STATS_INPUTS:
        if not run.file(layout.stats_path(name)).exists():
            atomic_write_json(run.file(layout.stats_path(name)), name)
    if not run.file(layout.RUN_JSON).exists():
        atomic_write_json(run.file(layout.RUN_JSON), {"run_id": path.name})
    run.publish(layout.RUNNING, phase="training")
    for epoch in range(run.state.epoch + 1, len(accuracies) + 1):
        faults.point("train:batch")
        if epoch == STOPPED_INSIDE and run.state.partial is None:
            _commit_position(run, epoch, batch=3)
        faults.point("validate:begin")
        saved = run.write_checkpoint(epoch, lambda tmp, e=epoch: tmp.write_bytes(f"weights of epoch {e}".encode()))
        row = {"epoch": epoch, "val_accuracy": accuracies[epoch - 1], "lr": 0.01 / epoch}
        run.commit(run.state.after_epoch(row, saved, rng=[[7, epoch]]))
        run.publish(layout.RUNNING)
    for name in layout.STATS_OUTPUTS:
        atomic_write_json(run.file(layout.stats_path(name)), {"evaluated": name})
    faults.point("finish:evaluated")
    run.finish(layout.FINISHED)
    return run


def _commit_position(run: RunDir, epoch: int, batch: int) -> None:
    """What the recorder does on a stop long before the epoch's end."""
    saved = run.write_checkpoint(epoch, lambda tmp: tmp.write_bytes(f"epoch {epoch}, batch {batch}".encode()), batch=batch)
    run.commit(run.state.at_position(Position(epoch, batch, saved, [[7, batch]], [1.5, 48.0], seconds=2.5)))
    run.publish(layout.RUNNING)


def _manifest_problems(path: Path) -> list[str]:
    """What ``sha256sum -c MANIFEST.sha256`` would complain about, and files listed too early."""
    manifest = path / layout.MANIFEST
    if not manifest.exists():
        return ["no manifest"] if (path / layout.STATE).exists() else []
    listed = layout.parse_manifest(manifest.read_text())
    problems = [rel for rel, digest in listed.items()
                if not (path / rel).is_file() or hashlib.sha256((path / rel).read_bytes()).hexdigest() != digest]
    state = json.loads((path / layout.STATUS).read_text()).get("state") if (path / layout.STATUS).exists() else None
    if state not in layout.FINAL_STATES and {layout.STATUS, layout.METRICS, *layout.TENSORBOARD_FILES} & set(listed):
        problems.append(f"status/metrics/event files listed while {state}")
    return problems


def _watch(monkeypatch: pytest.MonkeyPatch, at_point: Callable[[str], None]) -> list[str]:
    reached: list[str] = []

    def point(name: str) -> None:
        reached.append(name)
        at_point(name)

    monkeypatch.setattr(faults, "point", point)
    return reached


def _assert_finished(path: Path, accuracies: list[float] = ACCURACIES) -> None:
    rows = [json.loads(line) for line in (path / layout.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, len(accuracies) + 1))
    assert [r["lr"] for r in rows] == [0.01 / e for e in range(1, len(accuracies) + 1)]
    state = runstate.read(path)
    assert state is not None and state.best_epoch == accuracies.index(max(accuracies)) + 1
    assert (path / layout.BEST_WEIGHTS).read_bytes() == f"weights of epoch {state.best_epoch}".encode()
    assert _manifest_problems(path) == []
    assert set(layout.parse_manifest((path / layout.MANIFEST).read_text())) == {
        layout.BEST_WEIGHTS, layout.RUN_JSON, layout.STATUS, layout.METRICS, *layout.TENSORBOARD_FILES,
        *(layout.stats_path(n) for n in layout.STATS_INPUTS + layout.STATS_OUTPUTS)}
    for rel in layout.TENSORBOARD_FILES:  # one event per epoch, from 1, whatever was killed on the way
        steps = [step for _end, step in read_steps((path / rel).read_bytes()) if step is not None]
        assert steps == list(range(1, len(accuracies) + 1)), rel
    leftovers = [p.name for d in (path, path / layout.CHECKPOINTS_DIR, path / layout.STATS_DIR) for p in d.iterdir()
                 if layout.is_temp(p.name)]
    assert leftovers == []
    epochs = {f"{layout.CHECKPOINTS_DIR}/{p.name}" for p in (path / layout.CHECKPOINTS_DIR).iterdir()
              if layout.epoch_of(p.name) is not None}
    assert epochs == state.files()
    assert json.loads((path / layout.STATUS).read_text())["state"] == layout.FINISHED


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability is not what these tests check, and hundreds of fsyncs are slow."""
    import os

    monkeypatch.setattr(os, "fsync", lambda fd: None)


def test_the_manifest_verifies_at_every_failpoint_of_a_run_and_of_its_continuation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    checked: list[str] = []

    def check(name: str) -> None:
        problems = _manifest_problems(run)
        assert not problems, f"at {name}: {problems}"
        checked.append(name)

    reached = _watch(monkeypatch, check)
    _train(run, ACCURACIES[:3])
    # a continued run (a stopped one: status and metrics are listed) changes them only unlisted
    RunDir(run, runstate.read(run)).finish(layout.STOPPED)
    _train(run)
    assert set(reached) == set(faults.POINTS) - {"repair:temp-removed"} and len(checked) == len(reached)
    _assert_finished(run)


def test_a_kill_at_any_failpoint_is_repaired_by_the_next_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill at every point of a run, then one during the restart's repair or first epochs,
    then a restart to the end: nothing lost, nothing twice, best right, manifest true."""
    accuracies = ACCURACIES[:4]  # best moves at 1 and 3, not at 2 nor at 4 (a tie)
    total = len(_reached_by(monkeypatch, lambda: _train(tmp_path / "count", accuracies)))
    for k in range(total):
        run = tmp_path / f"killed-{k}"
        for crash_at in (k, k % 9, None):
            _crash_at(monkeypatch, crash_at)
            try:
                _train(run, accuracies)
            except Crash:
                assert crash_at is not None and _manifest_problems(run) == []
        _assert_finished(run, accuracies)


def _reached_by(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> list[str]:
    reached = _watch(monkeypatch, lambda name: None)
    action()
    return reached


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int | None) -> None:
    """From now on, the k-th failpoint reached raises Crash (None: never)."""
    count = iter(range(10**9))

    def crash(name: str) -> None:
        if next(count) == k:
            raise Crash(name)

    _watch(monkeypatch, crash)


def test_best_only_moves_on_a_strictly_better_epoch_and_never_back(tmp_path: Path) -> None:
    run = _train(tmp_path / "run")
    assert [r["val_accuracy"] for r in run.state.history] == ACCURACIES
    assert run.state.best_val_accuracy == 0.5 and run.state.best == Checkpoint(
        layout.epoch_weights(6), hashlib.sha256(b"weights of epoch 6").hexdigest())
    state = RunState()
    for epoch, acc in enumerate([0.3, 0.3, 0.2], 1):
        state = state.after_epoch({"epoch": epoch, "val_accuracy": acc},
                                  Checkpoint(layout.epoch_weights(epoch), "0" * 64))
    assert state.best_epoch == 1 and state.files() == {layout.epoch_weights(1), layout.epoch_weights(3)}


def test_status_compares_the_best_with_the_parents() -> None:
    alone = runstate.initial(None, None).status_fields()
    assert (alone["parent_best_val_accuracy"], alone["vs_parent"], alone["beat_parent"]) == (None, None, None)
    child = runstate.initial("parent", 0.6)
    child = child.with_parent_weights(Checkpoint(layout.epoch_weights(0), "0" * 64))
    fields = child.status_fields()
    assert (fields["best_val_accuracy"], fields["best_epoch"], fields["beat_parent"], fields["vs_parent"]) == (0.6, 0, False, 0.0)
    worse = child.after_epoch({"epoch": 1, "val_accuracy": 0.55}, Checkpoint(layout.epoch_weights(1), "1" * 64))
    assert worse.status_fields()["beat_parent"] is False and worse.best.file == layout.epoch_weights(0)
    better = worse.after_epoch({"epoch": 2, "val_accuracy": 0.61234}, Checkpoint(layout.epoch_weights(2), "2" * 64))
    fields = better.status_fields()
    assert (fields["beat_parent"], fields["vs_parent"], fields["best_epoch"]) == (True, 0.0123, 2)


def test_an_extended_runs_epoch_0_is_its_parents_weights(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "child", runstate.initial("parent", 0.6))
    run.create()
    atomic_write_json(run.file(layout.RUN_JSON), {})
    saved = run.write_checkpoint(0, lambda tmp: tmp.write_bytes(b"parent weights"))
    run.commit(run.state.with_parent_weights(saved))
    run.publish(layout.RUNNING)
    assert run.file(layout.BEST_WEIGHTS).read_bytes() == b"parent weights"
    status = run.read_json(layout.STATUS)
    assert (status["best_epoch"], status["best_val_accuracy"], status["beat_parent"]) == (0, 0.6, False)
    assert _manifest_problems(run.path) == []


def test_a_position_inside_an_epoch_is_committed_and_superseded_by_the_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    reached = _watch(monkeypatch, lambda name: _raise_at(reached, name, "validate:begin", STOPPED_INSIDE))
    with pytest.raises(Crash):  # killed after the position's commit, before the epoch's
        _train(run)
    state = runstate.read(run)
    assert state is not None and state.epoch == STOPPED_INSIDE - 1 and state.partial is not None
    assert (state.partial.epoch, state.partial.batch, state.partial.rng, state.partial.metrics, state.partial.seconds) == (
        STOPPED_INSIDE, 3, [[7, 3]], [1.5, 48.0], 2.5)
    position = layout.epoch_weights(STOPPED_INSIDE, 3)
    assert state.partial.weights.file == position == "checkpoints/epoch-0002-batch-0003.weights.h5"
    assert position in state.files() and (run / position).is_file()
    assert [r["epoch"] for r in state.history] == [1] and _manifest_problems(run) == []
    assert position not in layout.parse_manifest((run / layout.MANIFEST).read_text())
    _watch(monkeypatch, lambda name: None)
    done = _train(run)  # the continued run commits the epoch: the position goes
    assert done.state.partial is None and done.state.rng == [[7, len(ACCURACIES)]] and not (run / position).exists()
    _assert_finished(run)


def _raise_at(reached: list[str], name: str, point: str, nth: int) -> None:
    if name == point and reached.count(point) == nth:
        raise Crash(name)


def test_checkpoint_names_of_epochs_and_positions() -> None:
    assert layout.epoch_weights(7) == "checkpoints/epoch-0007.weights.h5"
    assert layout.checkpoint_of("epoch-0007.weights.h5") == (7, None) and layout.epoch_of("epoch-0007.weights.h5") == 7
    assert layout.checkpoint_of("epoch-0007-batch-0012.weights.h5") == (7, 12)
    assert layout.epoch_of("epoch-0007-batch-0012.weights.h5") == 7
    for other in ("best.weights.h5", "epoch-7.weights.h5", "epoch-0007-batch-12.weights.h5", "state.json"):
        assert layout.checkpoint_of(other) is None


def test_the_state_file_names_only_epoch_files_of_its_run(tmp_path: Path) -> None:
    for bad in ("../../etc/passwd", "checkpoints/best.weights.h5", "/tmp/epoch-0001.weights.h5",
                "checkpoints/epoch-0001-batch-01.weights.h5"):
        with pytest.raises(ValueError):
            Checkpoint(bad, "0" * 64)
    with pytest.raises(ValueError, match="does not name its own file"):  # a position names its own file only
        Position(2, 3, Checkpoint(layout.epoch_weights(2), "0" * 64), [], [], 0.0)
    run = _train(tmp_path / "run")
    doc = json.loads(run.file(layout.STATE).read_text())
    doc["history"] = doc["history"][1:]
    run.file(layout.STATE).write_text(json.dumps(doc))
    with pytest.raises(TrainerError, match="unreadable committed state"):
        runstate.read(run.path)
    doc = run.state.to_json()  # a position is always inside the epoch after the committed ones
    doc["partial"] = Position(2, 3, Checkpoint(layout.epoch_weights(2, 3), "0" * 64), [], [], 0.0).to_json()
    run.file(layout.STATE).write_text(json.dumps(doc))
    with pytest.raises(TrainerError, match="a position inside epoch 2 after 6 committed epochs"):
        runstate.read(run.path)


def test_a_run_directory_of_the_old_layout_is_one_clear_error(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / layout.CHECKPOINTS_DIR).mkdir(parents=True)
    (old / layout.LEGACY_STATE).write_text('{"epoch": 3}')
    (old / layout.BEST_WEIGHTS).write_bytes(b"w")
    with pytest.raises(UsageError, match=f"--init-from {old}"):
        runstate.read(old)
    from trainer.ml.train import train

    before = sorted(p.name for p in old.rglob("*"))
    with pytest.raises(UsageError, match="written by an older trainer"):
        train(TrainConfig(data_dir=str(tmp_path / "no-data"), run_dir=str(old)))
    assert sorted(p.name for p in old.rglob("*")) == sorted([*before, layout.RUN_LOCK])


def test_a_full_disk_keeps_the_committed_state_and_marks_the_run_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _train(tmp_path / "run", ACCURACIES[:2])
    run.finish(layout.FAILED, error="earlier")  # listed status ...
    run.repair(layout.RUNNING)  # ... unlisted again by a continued run
    state_before = run.file(layout.STATE).read_bytes()
    (run.file(layout.CHECKPOINTS_DIR) / f"{layout.TEMP_PREFIX}epoch-0003.weights.h5.1.0.weights.h5").write_bytes(b"x")
    run.file(layout.epoch_weights(3)).write_bytes(b"written, never committed")

    def full(path: Path, data: bytes, failpoint: str | None = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trainer.ml.rundir.atomic_write_bytes", full)
    run.fail_on_full_disk("no space left on device on X: free space and run `orch resume run --continue`")
    status = run.read_json(layout.STATUS)
    assert status["state"] == "failed" and status["error"].startswith("no space left on device on X")
    assert status["reason"] == layout.DISK_FULL  # its exit code is 14, not 8
    assert run.file(layout.STATE).read_bytes() == state_before
    assert sorted(p.name for p in run.file(layout.CHECKPOINTS_DIR).iterdir()) == [
        "best.weights.h5", "epoch-0001.weights.h5", "epoch-0002.weights.h5", "state.json"]
    assert _manifest_problems(run.path) == []


def test_disk_full_is_found_in_a_chain_of_causes() -> None:
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert disk_full_error(outer).errno == errno.EDQUOT
    assert disk_full_error(OSError(errno.EACCES, "denied")) is None


def test_failpoint_specs_and_the_points_the_code_reaches() -> None:
    assert faults.parse("") is None and faults.parse("commit:begin@3") == ("commit:begin", 3)
    for bad in ("commit:begin", "commit:begin@0", "nowhere@1", "commit:begin@x"):
        with pytest.raises(ValueError):
            faults.parse(bad)
    source = "".join(p.read_text() for p in (ROOT / "trainer").rglob("*.py"))
    used = set(re.findall(r'point\("([^"]+)"\)', source)) | set(re.findall(r'failpoint="([^"]+)"', source))
    assert used == set(faults.POINTS) | set(faults.MIRROR_POINTS)


def test_a_failpoint_kills_the_process_the_nth_time_it_is_reached() -> None:
    code = "from trainer.machine import faults\nfor i in range(5):\n    print(i, flush=True)\n    faults.point('commit:begin')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={faults.ENV: "commit:begin@3", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == -9 and proc.stdout.split() == ["0", "1", "2"]


def _hold_lock_in_a_child(run: Path) -> subprocess.Popen[str]:
    code = ("import sys, time\nfrom pathlib import Path\nfrom trainer.ml import runlock\n"
            "runlock.hold(Path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


def test_one_trainer_per_run_directory_and_a_killed_holder_blocks_nobody(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = _hold_lock_in_a_child(run)
    try:
        with pytest.raises(RunBusy, match=rf"in use by another trainer \(pid {child.pid}\)"):
            runlock.hold(run)
        before = sorted(p.name for p in run.iterdir())
        from trainer.ml.train import train

        with pytest.raises(RunBusy):  # before anything is written: not even status.json
            train(TrainConfig(data_dir=str(tmp_path / "no-data"), run_dir=str(run)))
        assert sorted(p.name for p in run.iterdir()) == before == [layout.RUN_LOCK]
    finally:
        child.kill()
        child.wait()  # reaped: its descriptors, and with them the lock, are gone
    runlock.hold(run)
    assert (run / layout.RUN_LOCK).read_text().strip().isdigit()


def test_a_full_train_log_does_not_change_the_exit_code() -> None:
    """Output left buffered on a full disk would make Python's own exit fail (exit 120)."""
    code = """
import errno, io, sys
from trainer.ml import cli, errors

class Full(io.RawIOBase):
    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")

sys.stdout = io.TextIOWrapper(io.BufferedWriter(Full()))

def full(args):
    print("a line still in the buffer")
    raise errors.DiskFull("no space left on device on X")

cli.cmd_check_data = full
sys.exit(cli.main(["check-data", "/nowhere"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 14 and proc.stderr == "trainer: error: no space left on device on X\n"
