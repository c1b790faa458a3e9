"""Faults a trainer must survive (trainer/contract/layout.py states the guarantees): SIGKILL at any
moment, a full disk, a second trainer on the same run directory. Real training runs on tiny
SYNTHETIC data.

ORCH_FAULT_KILLS sets the number of kills of the kill loop (CI default below: 3-8 minutes on
2 cores, idle to loaded, TensorFlow's start-up and tracing being most of each restart; the
failpoints come in a shuffled cycle, so successive seeds cover the others); bench/bench_faults.py
runs hundreds. ORCH_FAULT_SEED picks other kill moments. ORCH_FAULT_SIMULATE_FULL_DISK=1 runs the full-disk
test the way machines that cannot mount a tmpfs run it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.fault_harness import Judge, Reference, Scenario, kill_loop, make_data, reference_run
from tests.integration.trainer_proc import metrics, run_trainer, start_trainer, status, wait_for_epochs
from trainer.contract import layout
from trainer.contract.exitcodes import ExitCode
from trainer.machine import faults
from trainer.ml import runstate, stopping

pytestmark = pytest.mark.slow
KILLS = int(os.environ.get("ORCH_FAULT_KILLS", "10"))
SEED = int(os.environ.get("ORCH_FAULT_SEED", "0"))
# The kill loop's budget grows with the kills asked for: each costs one trainer start (TensorFlow's
# import is most of it, ~15 s on a loaded 2-core machine), plus the runs that finish meanwhile.
START_BUDGET_S = 60


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return Scenario(make_data(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, scenario: Scenario) -> tuple[Reference, Path]:
    """The uninterrupted run with the same command and seed."""
    run = tmp_path_factory.mktemp("reference") / "run"
    return reference_run(scenario, run), run


@pytest.mark.timeout(START_BUDGET_S * (KILLS + 4))
def test_sigkill_at_any_moment_keeps_every_guarantee(scenario: Scenario, reference: tuple[Reference, Path],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, ref_run = reference
    judge = Judge(scenario, ref, tmp_path / "scratch")
    (tmp_path / "scratch").mkdir()
    assert judge.at_end(ref_run) == []  # the checks themselves pass on an uninterrupted run
    tally = kill_loop(scenario, ref, judge, tmp_path, kills=KILLS, seed=SEED, log=lambda line: None)
    with capsys.disabled():
        print(f"\nfault injection: {tally.line()} ({tally.detail()})")
    assert tally.kills == KILLS
    assert not tally.violations, "\n".join(tally.violations)


def test_sigterm_keeps_finished_work_and_the_continued_run_is_the_uninterrupted_one(
        scenario: Scenario, reference: tuple[Reference, Path], tmp_path: Path) -> None:
    """`orch stop` (SIGTERM, sent at an exact moment by the failpoint hook) again and again,
    each attempt continuing the last one's run: what each stop committed, then the whole
    metrics file of the run continued to its end, against the uninterrupted run's."""
    ref, _ = reference
    n, run = ref.steps, tmp_path / "run"
    judge = Judge(scenario, ref, tmp_path)
    force = {stopping.ENV: "0"}  # any batch is far from its epoch's end: a position is committed
    stops = [  # (failpoint, its n-th time, environment, then committed: epochs, a position inside which epoch)
        ("train:batch", n + 3, force, (1, 2)),  # inside epoch 2
        ("train:batch", 2, force, (1, 2)),  # inside the rest of epoch 2, a continued position
        ("validate:begin", 1, {}, (2, None)),  # during epoch 2's validation: the epoch is kept
        ("train:batch", n, force, (3, None)),  # during epoch 3's last batch: kept, whatever the threshold
        ("train:batch", n - 3, {}, (4, None)),  # 3 batches before epoch 4's end: it is finished first
    ]
    positions = []
    for k, (point, nth, env, committed) in enumerate(stops):
        log = tmp_path / f"stop-{k}.log"
        proc = start_trainer(*scenario.argv(run), log=log, env={faults.SIGNAL_ENV: f"{point}@{nth}", **env})
        assert proc.wait(timeout=300) == ExitCode.RUN_STOPPED, log.read_text()[-3000:]
        state = runstate.read(run)
        assert (state.epoch, state.partial and state.partial.epoch) == committed, (k, state)
        positions += [state.partial.batch] if state.partial else []
        kept = f"epoch {state.epoch}" + (f" and batch {state.partial.batch} of epoch 2" if state.partial else "")
        assert log.read_text().splitlines()[-1] == (f"[trainer] stopped by signal 15 after {kept}; continue with "
                                                    "`orch resume run --continue`")
        assert status(run)["state"] == "stopped" and judge.after_kill(run) == [], k
    assert 3 <= positions[0] < positions[1] < n  # the second stop trained on from the first position
    run_trainer(*scenario.argv(run))
    assert judge.at_end(run) == []  # every field of metrics.jsonl but seconds: the uninterrupted run's


def test_a_full_disk_fails_the_run_cleanly_and_it_continues_once_there_is_space(
        scenario: Scenario, reference: tuple[Reference, Path], tmp_path: Path) -> None:
    """A small tmpfs that fills up after a few epochs (train.log in the run directory, as orch
    launches it). Where this machine cannot mount one, a full disk simulated at the trainer's
    write calls (ORCH_TRAINER_FULL_AT) stands in: the test runs either way."""
    ref, _ = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount_tmpfs(disk, "2m")
    run = disk / "run"
    run.mkdir()
    try:
        env = {"PYTHONUNBUFFERED": ""}  # block-buffered output, as under orch's nohup
        if not mounted:
            env[faults.FULL_ENV] = "weights:temp@4"
        proc = start_trainer(*scenario.argv(run), log=run / layout.TRAIN_LOG, env=env)
        if mounted:
            wait_for_epochs(run, 3, proc)
            _fill(disk / "filler")
        assert proc.wait(timeout=300) == ExitCode.DISK_FULL, _tail(run)
        st = status(run)
        assert st["state"] == "failed", st
        assert re.fullmatch(rf"no space left on device on {re.escape(str(run))}\S*: free space and run "
                            r"`orch resume run --continue`", st["error"]), st["error"]
        state = runstate.read(run)
        assert state is not None and state.epoch >= 3
        assert [r["epoch"] for r in metrics(run)] == list(range(1, state.epoch + 1))
        assert not [p for p in run.rglob("*") if layout.is_temp(p.name)]
        assert subprocess.run(["sha256sum", "--quiet", "-c", layout.MANIFEST], cwd=run).returncode == 0
        epochs_at_failure = state.epoch

        (disk / "filler").unlink(missing_ok=True)
        run_trainer(*scenario.argv(run))  # `orch resume run --continue` runs the same command
        judge = Judge(scenario, ref, tmp_path)
        assert judge.at_end(run) == []  # epochs 1..12 once each, the reference's learning rates
        assert status(run)["error"] is None and runstate.read(run).epoch == scenario.epochs > epochs_at_failure
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    how = "a 2 MB tmpfs" if mounted else "SIMULATED at the trainer's write calls: this machine cannot mount"
    print(f"full disk ({how}): full after epoch {epochs_at_failure}, exit 14, continued to the end")


def test_a_second_trainer_on_the_same_run_dir_is_refused_and_writes_nothing(scenario: Scenario, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = start_trainer(*scenario.argv(run), log=tmp_path / "first.log")
    try:
        wait_for_epochs(run, 1, first)
        first.send_signal(signal.SIGSTOP)  # holds still, and holds the lock
        before = _snapshot(run)
        second = run_trainer(*scenario.argv(run), check=False)
        assert second.returncode == ExitCode.BUSY
        assert second.stderr == (f"trainer: error: run directory {run} is in use by another trainer (pid {first.pid}); "
                                 "wait for it to end or stop it first\n")
        assert _snapshot(run) == before  # not even status.json
    finally:
        first.kill()  # SIGKILL: the lock dies with its holder
        first.wait()
    assert "continuing from epoch" in run_trainer(*scenario.argv(run)).stdout
    assert status(run)["state"] == "finished"


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.environ.get("ORCH_FAULT_SIMULATE_FULL_DISK") == "1":
        return False
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _fill(path: Path) -> None:
    """Take every free byte of the filesystem."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _tail(run: Path) -> str:
    return (run / layout.TRAIN_LOG).read_text(errors="replace")[-3000:]
