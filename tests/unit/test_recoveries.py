"""A run's recoveries: one wire record (trainer.contract.wire.Recovery), handed to the continued
trainer as --record-recovery, committed in its state, read back (untrusted) and shown by
`orch runs`, `orch monitor` and the last line of a followed run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from orchestrator.config import DeployConfig
from orchestrator.context import Context, Output
from orchestrator.deploy import _recovery_args, resume, trainer_argv
from orchestrator.errors import ConfigError
from orchestrator.monitor import RunView
from orchestrator.runs import recovered, run_json, runs_table
from trainer.contract import layout, options
from trainer.contract.wire import MAX_RECOVERIES, Recovery, RecoveryError, RunInfo, Snapshot
from trainer.machine.probe import describe_run
from trainer.ml import runstate
from trainer.ml.rundir import RunDir
from trainer.ml.runstate import Checkpoint, RunState
from trainer.ml.train import _record_recovery

AT = "2026-11-21T10:30:15+00:00"
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]")
ESC = "\x1b]0;owned\x07\x1b[2J\u202e"


def record(**fields: object) -> Recovery:
    return Recovery(**({"at": AT, "why": "spot interruption (terminate)", "kind": "preempted",
                        "old_instance": "i-0aaa", "new_instance": "i-0bbb", "epoch_restored": 3,
                        "lost_seconds": 95.0} | fields))


# --------------------------------------------------------------------------- the committed state


def test_the_state_round_trips_with_and_without_recoveries() -> None:
    plain = RunState()
    assert RunState.from_json(plain.to_json()) == plain and plain.to_json()["recoveries"] == []
    once = plain.with_recovery(record())
    assert once.recoveries == (record().to_json(),)
    assert RunState.from_json(json.loads(json.dumps(once.to_json()))) == once
    assert once.status_fields()["recoveries"] == [record().to_json()]
    # a state written before recoveries existed reads as none
    older = {k: v for k, v in plain.to_json().items() if k != "recoveries"}
    assert RunState.from_json(older).recoveries == ()
    # a state at an epoch keeps its record through the epoch's commit
    saved = Checkpoint(layout.epoch_weights(1), "0" * 64)
    row = {"epoch": 1, "val_accuracy": 0.5}
    assert once.after_epoch(row, saved).recoveries == once.recoveries


def test_a_recovery_is_recorded_once_and_the_last_ones_are_kept() -> None:
    state = RunState().with_recovery(record())
    assert state.with_recovery(record(why="again")) is state  # the same `at`: a relaunch after a failed start
    many = state
    for i in range(MAX_RECOVERIES + 5):
        many = many.with_recovery(record(at=f"2026-11-22T00:00:{i % 60:02d}+0{i // 60}:00"))
    assert len(many.recoveries) == MAX_RECOVERIES and many.recoveries[-1]["at"] == "2026-11-22T00:00:44+01:00"


def test_a_crafted_recoveries_list_in_a_state_keeps_only_records() -> None:
    doc = RunState().to_json() | {"recoveries": [record().to_json(), {"at": "soon", "why": "x"}, 7,
                                                 {"why": "no time"}, record(at="2026-11-21T11:00:00").to_json()]}
    assert [r["at"] for r in RunState.from_json(doc).recoveries] == [AT, "2026-11-21T11:00:00"]
    assert RunState.from_json(RunState().to_json() | {"recoveries": "lots"}).recoveries == ()


def test_the_trainer_commits_the_record_at_epoch_0_with_its_own_epoch_and_time_lost(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    lines: list[str] = []
    _record_recovery(run, record(epoch_restored=7, lost_seconds=None, at="2020-01-01T00:00:00"), lines.append)
    committed = runstate.read(run.path)
    assert committed is not None and committed == run.state
    (got,) = committed.recoveries
    assert got["epoch_restored"] == 0  # the trainer knows which epoch it continues from, not orch
    assert got["lost_seconds"] > 86400  # from `at` (a naive time is UTC) to now
    assert "recovery 1 recorded (preempted: spot interruption (terminate)); continuing from epoch 0" in lines[0]
    before = (run.path / layout.STATE).read_bytes()
    _record_recovery(run, record(at="2020-01-01T00:00:00"), lines.append)
    assert (run.path / layout.STATE).read_bytes() == before and "already recorded" in lines[1]
    _record_recovery(run, record(), lines.append)  # orch's figure for the time lost is kept
    assert runstate.read(run.path).recoveries[-1]["lost_seconds"] == 95.0  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the trainer's option


@pytest.mark.parametrize("value, message", [
    ("x" * 5000, "too long (5000 characters; at most 4096)"),
    ("{not json", "not JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"why": "x"}), "at: missing"),
    (json.dumps({"at": 17, "why": "x"}), "at: must be text, got int"),
    (json.dumps({"at": "yesterday", "why": "x"}), "at: not an ISO 8601 time: 'yesterday'"),
    (json.dumps({"at": AT, "why": "x", "kind": "nuked"}), "kind: must be one of preempted, restart, got 'nuked'"),
    (json.dumps({"at": AT, "why": "x", "epoch_restored": True}), "epoch_restored: must be an integer or null"),
    (json.dumps({"at": AT, "why": "x", "epoch_restored": -1}), "epoch_restored: out of range or too long"),
    (json.dumps({"at": AT, "why": "x", "lost_seconds": "lots"}), "lost_seconds: must be a number or null"),
    (json.dumps({"at": AT, "why": "x", "lost_seconds": 1e300}), "lost_seconds: out of range or too long"),
    (json.dumps({"at": AT, "why": "y" * 301}), "why: out of range or too long"),
    (json.dumps({"at": AT, "why": f"boom {ESC}"}), "why: holds control characters"),
    (json.dumps({"at": AT, "why": "x", "old_instance": ["i-1"]}), "old_instance: must be text or null, got list"),
    (json.dumps({"at": AT, "why": "x", "admin": True}), "unknown field 'admin'"),
])
def test_a_hostile_record_is_one_usage_line_and_nothing_is_written(
        value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.ml.cli import main

    with pytest.raises(RecoveryError, match=re.escape(message)):
        Recovery.parse(value)
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path), "--run-dir", str(run), "--record-recovery", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainer: error: argument --record-recovery: ") and message in err
    assert err.count("\n") == 1 and not UNSAFE.search(err.replace("\n", "")) and len(err) < 1000
    assert not run.exists()


def test_orch_hands_the_record_over_as_one_token_and_refuses_it_after_the_double_dash() -> None:
    rec = record(why='a "quoted" reason, with -- dashes and unicode é')
    args = _recovery_args(rec)
    assert len(args) == 1 and _recovery_args(None) == []
    given = options.parse_argv(args)
    assert Recovery.parse(given["record_recovery"]) == rec
    cfg = DeployConfig.model_validate({"target": "local", "remote": {"root": "/tmp/x", "python": sys.executable}})
    with pytest.raises(ConfigError, match="--record-recovery: set by orch when it recovers a run"):
        trainer_argv(cfg, args)


def test_a_recovery_is_only_for_a_continued_run(tmp_path: Path) -> None:
    cfg = DeployConfig.model_validate({"target": "local", "remote": {"root": str(tmp_path), "python": sys.executable}})
    with pytest.raises(ConfigError, match="only with --continue"):
        resume(Context(cfg, Output.captured()), "r1", recovery=record())


# --------------------------------------------------------------------------- reading it back


def test_a_crafted_status_json_recoveries_list_is_bounded_and_cleaned(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    good = record(why=f"spot {ESC}" + "w" * 1000, old_instance="i-" + "9" * 500).to_json()
    good |= {"why": f"spot {ESC}" + "w" * 1000, "old_instance": "i-" + "9" * 500, "lost_seconds": -5,
             "epoch_restored": "three"}  # as a crafted file holds it, unbounded
    junk = [{"at": "not a time", "why": "x"}, {"at": AT}, "text", None, {"at": AT, "why": "x", "kind": "other"}]
    items = [dict(good, at=f"2026-11-21T10:{i // 60:02d}:{i % 60:02d}") for i in range(500)] + junk
    (run / layout.STATUS).write_text(json.dumps({"state": "finished", "epoch": 3, "epochs": 3, "recoveries": items}))
    info = RunInfo.from_json(json.loads(json.dumps(describe_run(run).to_json())))  # as the probe's answer travels
    # the last MAX_RECOVERIES items are read (the first of them is item 405), and the junk among them is left out
    assert len(info.recoveries) == MAX_RECOVERIES - len(junk)
    first = info.recoveries[0]
    assert first.at == "2026-11-21T10:06:45" and not UNSAFE.search(first.why) and len(first.why) == 300
    assert first.why.startswith("spot ?]0;owned??[2J?") and first.why.endswith("...")
    assert len(first.old_instance or "") == 64 and first.lost_seconds is None and first.epoch_restored is None
    assert info.lost_seconds is None and recovered(info) == f"{MAX_RECOVERIES - len(junk)} recoveries"
    assert len(RunInfo("r", recoveries=[record()] * 300).recoveries) == MAX_RECOVERIES  # however it is built


# --------------------------------------------------------------------------- showing it


def _snap(state: str, recoveries: list[dict]) -> Snapshot:
    return Snapshot.from_json({"run": {"run_id": "r7", "state": state, "alive": False, "epoch": 10, "epochs": 10,
                                       "best_val_accuracy": 0.61, "best_epoch": 9, "recoveries": recoveries}})


def test_monitor_shows_the_recoveries_and_the_last_line_counts_them() -> None:
    from rich.console import Console

    two = [record(lost_seconds=70.0).to_json(),
           record(at="2026-11-21T11:00:00+00:00", why=f"restart after a crash {ESC}", kind="restart",
                  lost_seconds=110.0).to_json()]
    view = RunView("r7")
    view.update(_snap("finished", two))
    assert view.summary().startswith("run r7 finished after 2 recoveries, 3 min lost at epoch 10/10: "
                                     "best val_accuracy 0.6100 (epoch 9)")
    console = Console(record=True, width=200)
    console.print(view.render())
    text = console.export_text()
    assert "recovered 2 times, 3 min lost (last: 2026-11-21 11:00:00, restart after a crash ?]0;owned" in text
    assert not UNSAFE.search(text)
    doc = view.to_json()
    assert [r["kind"] for r in doc["recoveries"]] == ["preempted", "restart"] and doc["lost_seconds"] == 180.0
    view.update(_snap("finished", []))
    console = Console(record=True, width=200)
    console.print(view.render())
    assert "recover" not in console.export_text() and "recover" not in view.summary()
    assert view.to_json()["recoveries"] == [] and view.to_json()["lost_seconds"] is None


def test_runs_shows_a_count_and_the_time_lost_when_there_are_any() -> None:
    from rich.console import Console

    plain = RunInfo("plain", state="finished", epoch=3, epochs=3)
    once = RunInfo("once", state="finished", epoch=3, epochs=3, recoveries=[record(lost_seconds=40.0)])
    console = Console(record=True, width=250)
    console.print(runs_table([plain]))
    assert "recovered" not in console.export_text()
    console = Console(record=True, width=250)
    console.print(runs_table([plain, once]))
    text = console.export_text()
    assert "recovered" in text and "1 recovery, 40 s lost" in text
    assert run_json(once)["recovered"] == 1 and run_json(once)["lost_seconds"] == 40.0
    assert run_json(once)["recoveries"][0]["new_instance"] == "i-0bbb"
    assert run_json(plain)["recovered"] == 0 and run_json(plain)["lost_seconds"] is None
    hours = RunInfo("h", recoveries=[record(lost_seconds=2.5 * 3600)])
    assert recovered(hours, noun=False) == "recovered once, 2.5 h lost"
