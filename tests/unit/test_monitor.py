"""Monitor's pure parts: nvidia-smi CSV, run state, trends, JSON snapshot."""

import sys
from pathlib import Path

from orchestrator.errors import ExitCode
from orchestrator.monitor import RunView, sparkline
from trainer.contract.wire import Snapshot, parse_nvidia_smi

FIXTURE = Path(__file__).parents[1] / "fixtures" / "nvidia-smi-4gpu.csv"


def test_parses_several_gpus_from_real_csv() -> None:
    gpus = parse_nvidia_smi(FIXTURE.read_text())
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert gpus[0].name == "NVIDIA A10G" and gpus[0].utilization == 97 and gpus[0].memory_used == 21413
    assert gpus[0].memory_total == 23028 and gpus[0].temperature == 71 and gpus[0].power == 205.31
    assert gpus[2].power is None  # [N/A]
    assert gpus[3].name == "NVIDIA A100-SXM4-40GB" and gpus[3].utilization is None  # [Not Supported]


def test_names_with_commas_and_blank_lines() -> None:
    gpus = parse_nvidia_smi("\n0, Tesla T4, rev 2, 10, 100, 15360, 40, 30.5\n\n")
    assert len(gpus) == 1 and gpus[0].name == "Tesla T4, rev 2" and gpus[0].power == 30.5
    assert parse_nvidia_smi("") == []


def snap(state: str | None, alive: bool, metrics: list, count: int, gpus_csv: str | None = None,
         **run: object) -> Snapshot:
    """A snapshot as the probe's JSON would carry it (through the wire record's parser)."""
    gpus = [g.__dict__ for g in parse_nvidia_smi(gpus_csv)] if gpus_csv else []
    return Snapshot.from_json({
        "run": {"run_id": "r", "state": state, "alive": alive, "epoch": count, "epochs": 10,
                "best_val_accuracy": 0.5, "best_epoch": 1} | run,
        "metrics": metrics, "metrics_count": count, "log_tail": ["line"],
        "host": {"gpus": gpus, "gpu_error": None if gpus else "no nvidia-smi", "load": {"cpus": 2, "loadavg": [0.5]}}})


def row(epoch: int, acc: float) -> dict:
    return {"epoch": epoch, "loss": 1.0 / epoch, "accuracy": acc, "val_loss": 1.0, "val_accuracy": acc, "seconds": 2.0}


def test_view_accumulates_metrics_and_knows_the_state() -> None:
    view = RunView("r")
    view.update(snap("running", True, [row(1, 0.3), row(2, 0.4)], 2, FIXTURE.read_text()))
    view.update(snap("running", True, [row(3, 0.5)], 3))
    assert [h.epoch for h in view.history] == [1, 2, 3]
    assert view.state == "running" and not view.final and view.eta_seconds() == 14.0
    doc = view.to_json()
    assert doc["val_accuracy"] == 0.5 and doc["gpus"] == [] and doc["alive"] is True
    assert set(doc) >= {"state", "epoch", "epochs", "val_accuracy", "best_val_accuracy", "best_epoch",
                        "alive", "gpus", "log_tail"}
    view.update(snap("running", False, [], 3))
    assert view.state == "died" and view.final and view.exit_code == ExitCode.RUN_DIED
    assert "--continue" in view.summary()
    # A continued run rewrites metrics.jsonl: monitor re-syncs instead of double counting.
    view.update(snap("running", True, [row(1, 0.3), row(2, 0.4)], 2))
    assert [h.epoch for h in view.history] == [1, 2]


def test_exit_codes_per_final_state() -> None:
    for state, code in (("finished", 0), ("failed", 8), ("stopped", 9)):
        view = RunView("r")
        view.update(snap(state, False, [], 0))
        assert view.final and int(view.exit_code) == code


def test_render_with_and_without_gpus() -> None:
    from rich.console import Console

    view = RunView("r")
    view.update(snap("running", True, [row(1, 0.3)], 1, FIXTURE.read_text()))
    console = Console(record=True, width=120)
    console.print(view.render())
    text = console.export_text()
    assert "NVIDIA A100-SXM4-40GB" in text and "21413/23028" in text and "epoch 1/10" in text
    view.update(snap("running", True, [], 1))
    console = Console(record=True, width=120)
    console.print(view.render())
    assert "no GPU (no nvidia-smi); CPU load 0.5 on 2 cores" in console.export_text()


def test_sparkline() -> None:
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([]) == "" and sparkline([1.0, 1.0]) == "▁▁"


def test_a_finished_run_is_never_shown_with_a_live_process() -> None:
    view = RunView("r")
    view.update(snap("finished", True, [row(1, 0.3)], 1))  # status written, exit not yet done
    assert view.final and "alive" not in view.process_text()
    view.update(snap("finished", False, [], 1))
    assert view.process_text() == "process ended"
    view.update(snap("running", True, [], 1))
    assert view.process_text() == "process alive"


def test_summary_says_whether_an_extended_run_beat_its_parent() -> None:
    view = RunView("child")
    parent = {"parent": "first", "parent_best_val_accuracy": 0.61}
    view.update(snap("finished", False, [row(1, 0.7)], 1, vs_parent=0.0123, beat_parent=True, **parent))
    assert "parent first best 0.6100: +0.0123, beat it" in view.summary()
    assert "best val_accuracy 0.5000 (epoch 1)" in view.summary()
    view.update(snap("finished", False, [], 1, vs_parent=0.0, beat_parent=False, best_epoch=0, **parent))
    assert "+0.0000, did not beat it" in view.summary()
    assert "best val_accuracy 0.5000 (epoch 0, the parent's weights)" in view.summary()  # not a bare "epoch 0"


def test_monitor_ends_at_once_on_a_run_that_never_started(tmp_path: Path) -> None:
    """A run folder whose trainer never wrote a state and has no process: `died`, within one
    refresh, with the log's last lines (it used to wait forever)."""
    import sys

    from orchestrator.config import DeployConfig
    from orchestrator.context import Context
    from orchestrator.monitor import monitor

    run = tmp_path / "runs" / "never"
    run.mkdir(parents=True)
    (run / "deploy.json").write_text("{}")
    (run / "train.log").write_text("Traceback (most recent call last):\nModuleNotFoundError: No module named 'keras'\n")
    cfg = DeployConfig.model_validate({"target": "local", "remote": {"root": str(tmp_path), "python": sys.executable}})
    frames = []
    view = monitor(Context(cfg), "nev", interval=3600, show=frames.append)  # a prefix of the id will do
    assert len(frames) == 1 and view.state == "died" and view.exit_code == ExitCode.RUN_DIED
    assert "No module named 'keras'" in view.summary()


def finished_run(root: Path, epochs: int) -> Path:
    import json

    run = root / "runs" / "r1"
    run.mkdir(parents=True, exist_ok=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epoch": epochs, "epochs": epochs}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(row(e, 0.5)) + "\n" for e in range(1, epochs + 1)))
    return run


def test_snapshots_come_from_one_command_started_again_when_killed_and_gone_when_closed(tmp_path: Path) -> None:
    """The monitor's refreshes on the local target: ONE machine-side process answers them all;
    killed, it is started again at the next refresh; closed, it is gone."""
    import os
    import signal

    from tests.conftest import local_machine
    from tests.servers import processes_with

    run = finished_run(tmp_path, 2)
    m = local_machine(tmp_path)
    with m.snapshots("r1") as feed:  # type: ignore[attr-defined]
        first = feed.get(0, 5)
        [pid] = processes_with("snapshots", str(run))
        finished_run(tmp_path, 3)
        second = feed.get(2, 5)  # what monitor asks: the metrics lines after the two it has
        assert processes_with("snapshots", str(run)) == [pid]  # the same process answered
        assert [e.epoch for e in first.metrics] == [1, 2] and [e.epoch for e in second.metrics] == [3]
        assert second.metrics_count == 3 and second.run.state == "finished"
        os.kill(pid, signal.SIGKILL)
        assert feed.get(3, 5).metrics_count == 3  # answered by a new one
        [again] = processes_with("snapshots", str(run))
        assert again != pid
    assert processes_with("snapshots", str(run)) == []


def crafted_machine(root: Path, answers: str) -> object:
    """A local machine whose ``snapshots`` verb answers each question with the framed line
    ``answers`` makes of it (a Python expression of ``out`` and ``n``, the question's number),
    then the true snapshot's answer for the rest."""
    from orchestrator.config import DeployConfig
    from orchestrator.context import Context
    from orchestrator.local import LocalRemote
    from orchestrator.machine import Machine, bundle_payload
    from trainer.contract.codeversion import bundle_files

    files = bundle_files()
    files["trainer/machine/probe.py"] += f"""

def snapshots(run_dir, idle, out):
    for n, question in enumerate(out.questions(idle)):
        crafted = {answers}
        if crafted is None:
            offset, lines = (int(w) for w in question.split())
            out.answer(snapshot(run_dir, offset, lines))
        else:
            sys.stdout.write(crafted)
            sys.stdout.flush()
    return 0
""".encode()
    cfg = DeployConfig.model_validate({"target": "local", "remote": {"root": str(root), "python": sys.executable}})
    return Machine(Context(cfg), LocalRemote(root), bundle_payload(files))


def test_an_answer_that_is_too_long_or_not_a_snapshot_is_refused_and_the_next_is_read(tmp_path: Path) -> None:
    """Answers are bounded and checked as one-shot ones are: a record beyond MAX_LINE (valid
    JSON had it not been cut) and one that is not a Snapshot are refused; each still answers its
    own question, so the next question gets its own answer."""
    import pytest

    from orchestrator.errors import RemoteError
    from orchestrator.remote import MAX_LINE

    finished_run(tmp_path, 2)
    huge = "'\\n' + out.frame + ' answer {\"run\": {\"run_id\": \"r1\"}, \"log_tail\": [\"' + 'x' * " \
           f"{MAX_LINE} + '\"]}}\\n'"
    m = crafted_machine(tmp_path, f"{huge} if n == 0 else '\\n' + out.frame + ' answer {{\"run\": 5}}\\n' "
                                  "if n == 1 else None")
    with m.snapshots("r1") as feed:  # type: ignore[attr-defined]
        with pytest.raises(RemoteError, match=r"answer \(snapshots\) was not understood: not JSON, or longer than 32"):
            feed.get(0, 5)
        with pytest.raises(RemoteError, match=r"not understood: Snapshot.run: missing or not"):
            feed.get(0, 5)
        assert feed.get(0, 5).metrics_count == 2


def test_a_snapshots_command_nobody_asks_ends_by_itself_and_the_next_refresh_starts_another(tmp_path: Path) -> None:
    """IDLE seconds without a question (a connection gone without a word, a laptop asleep): the
    machine's side ends by itself; the next refresh starts another."""
    import time

    from tests.conftest import local_machine
    from tests.servers import processes_with

    run = finished_run(tmp_path, 1)
    with local_machine(tmp_path).snapshots("r1", idle=0.2) as feed:  # type: ignore[attr-defined]
        feed.get(0, 5)
        [pid] = processes_with("snapshots", str(run))
        deadline = time.monotonic() + 120  # a safety net for a hang: the loop ends when it is gone
        while pid in processes_with("snapshots", str(run)):
            assert time.monotonic() < deadline, "the idle snapshots command never ended"
            time.sleep(0.05)
        assert feed.get(0, 5).metrics_count == 1


def test_header_json_and_train_log_name_the_same_epoch() -> None:
    """While epoch 4 trains (3 committed), train.log says `Epoch 4/10`: so do the header and the
    JSON's training_epoch; `epoch` stays the count of finished epochs."""
    from rich.console import Console

    view = RunView("r")
    view.update(snap("running", True, [row(1, 0.3), row(2, 0.4), row(3, 0.5)], 3, phase="training"))
    console = Console(record=True, width=120)
    console.print(view.render())
    assert "epoch 4/10 (3 done)" in console.export_text()
    doc = view.to_json()
    assert doc["epoch"] == 3 and doc["training_epoch"] == 4
    view.update(snap("finished", False, [], 10, phase=None))
    assert view.to_json()["training_epoch"] is None
