"""Spot notices on the machine: the watcher's IMDSv2 client against a stand-in on 127.0.0.1
(token first, 404 while there is nothing, 401 renews the token, bounded and checked answers,
never a GET without a token), its once-per-notice logic, and the trainer's reading of a notice."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ImdsStandIn, imds_stand_in
from tests.unit.test_watcher import start_watcher
from trainer.contract import layout
from trainer.contract.wire import Interruption, RunInfo, Snapshot
from trainer.machine import watcher
from trainer.machine.imds import MAX_ANSWER, Imds, ImdsError
from trainer.machine.proc import pid_line
from trainer.machine.readers import read_json
from trainer.ml import stopping

ACTION, REBALANCE = ImdsStandIn.INSTANCE_ACTION, ImdsStandIn.REBALANCE


@pytest.fixture
def imds() -> Iterator[ImdsStandIn]:
    with imds_stand_in() as server:
        yield server


def test_no_notice_is_a_404_asked_with_a_token_and_a_notice_is_read(imds: ImdsStandIn) -> None:
    client = Imds(imds.url)
    assert client.instance_action() is None and client.rebalance() is None
    when = imds.notice("stop")
    notice = client.instance_action()
    assert notice is not None and (notice.action, notice.notice_time) == ("stop", when)
    assert notice.noticed_at is not None and abs(notice.noticed_at - time.time()) < 60
    assert client.rebalance() is None
    at = imds.rebalance()
    assert client.rebalance() == at
    assert imds.token_requests == 1  # one token, kept for its TTL
    assert imds.requests[0] == ("PUT", ImdsStandIn.TOKEN) and imds.tokenless_requests == 0


def test_an_expired_token_is_renewed_once(imds: ImdsStandIn) -> None:
    client = Imds(imds.url)
    assert client.instance_action() is None
    imds.expire_tokens()
    imds.notice()
    assert client.instance_action() is not None  # 401, a new token, the same question again
    assert imds.token_requests == 2 and imds.tokenless_requests == 0
    imds.respond(ImdsStandIn.TOKEN, 200, b"")  # the service gives no token at all now
    imds.expire_tokens()
    with pytest.raises(ImdsError):
        client.instance_action()
    assert imds.tokenless_requests == 0  # no token, no question (never IMDSv1)


def test_no_token_means_no_question(imds: ImdsStandIn) -> None:
    imds.respond(ImdsStandIn.TOKEN, 403, b"")  # a service that refuses tokens (IMDS disabled)
    with pytest.raises(ImdsError, match="no token"):
        Imds(imds.url).instance_action()
    assert imds.gets(ACTION) == 0 and imds.tokenless_requests == 0


@pytest.mark.parametrize("status, body", [
    (200, b"not json"),
    (200, b"[1, 2]"),
    (200, b'{"action": "explode", "time": "2026-01-01T00:00:00Z"}'),
    (200, b'{"action": "terminate", "time": "2026-01-01T00:00:00Z\\u001b]0;owned\\u0007"}'),
    (200, b'{"action": "terminate", "time": "' + b"9" * 100 + b'"}'),
    (200, b'{"action": "terminate", "pad": "' + b"x" * MAX_ANSWER + b'"}'),
    (500, b""),
    (302, b""),
])
def test_a_crafted_or_odd_answer_is_an_error_never_a_notice(imds: ImdsStandIn, status: int, body: bytes) -> None:
    imds.respond(ACTION, status, body)
    with pytest.raises(ImdsError):
        Imds(imds.url).instance_action()


def test_a_silent_or_absent_service_fails_fast() -> None:
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        began = time.monotonic()
        with pytest.raises(ImdsError):
            Imds(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5).instance_action()
        assert time.monotonic() - began < 10
    with pytest.raises(ImdsError):
        Imds("file:///etc/passwd")


class Trainer:
    """A stand-in trainer process for a run folder: counts the SIGTERMs it gets and lives on."""

    def __init__(self, run: Path) -> None:
        code = ("import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *a: print('TERM', flush=True))\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        run.mkdir(parents=True, exist_ok=True)
        (run / layout.PID_FILE).write_text(pid_line(self.proc.pid))
        (run / layout.STATUS).write_text(json.dumps({"state": "running", "pid": self.proc.pid}))

    def wait_terms(self, n: int = 1) -> None:
        """Until it has handled ``n`` more SIGTERMs (read one at a time: two sent at once may
        merge into one, as standard signals do)."""
        assert self.proc.stdout is not None
        for _ in range(n):
            assert self.proc.stdout.readline() == "TERM\n"

    def terms(self) -> int:
        """The SIGTERMs it handled that no wait_terms read; it is killed."""
        self.proc.kill()
        out, _ = self.proc.communicate()
        return out.count("TERM")


def test_a_notice_is_written_and_signalled_once_per_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    runs = root / layout.RUNS_DIR
    first, second = Trainer(runs / "a"), Trainer(runs / "b")
    (runs / "done").mkdir(parents=True)
    (runs / "done" / layout.STATUS).write_text(json.dumps({"state": "finished"}))
    notice = Interruption("terminate", "2026-11-21T10:32:15Z", time.time())
    done: set = set()
    assert watcher.interrupt(root, notice, done) == ["a", "b"]
    first.wait_terms()
    second.wait_terms()
    assert watcher.interrupt(root, Interruption("terminate", "2026-11-21T10:32:15Z", time.time()), done) == []
    assert watcher.interrupt(root, notice) == []  # a new watcher: the run's interruption.json says it is done
    assert first.terms() == 0
    first = Trainer(runs / "a")  # the run continued on the same machine while the notice stays posted
    assert watcher.interrupt(root, notice, set()) == []  # the same notice never stops the continued trainer
    written = json.loads((runs / "a" / layout.INTERRUPTION).read_text())
    assert written == {"action": "terminate", "notice_time": "2026-11-21T10:32:15Z", "noticed_at": notice.noticed_at}
    assert not (runs / "done" / layout.INTERRUPTION).exists()
    later = Interruption("terminate", "2026-11-21T11:00:00Z", time.time())  # another notice: acted on again
    assert watcher.interrupt(root, later, done) == ["a", "b"]
    first.wait_terms()
    second.wait_terms()
    assert first.terms() == 0 and second.terms() == 0  # nothing more than once per notice
    assert "spot: EC2 gave notice (terminate at 2026-11-21T10:32:15Z): run a sent SIGTERM" in \
        (root / layout.WATCHER_LOG).read_text()


def wait_for(predicate, what: str, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_watcher_polls_spot_notices_until_neither_setting_is_left(tmp_path: Path, imds: ImdsStandIn,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.machine.probe import snapshot

    root = tmp_path / "root"
    trainer = Trainer(root / layout.RUNS_DIR / "r1")
    root.joinpath(layout.SPOT_SETTING).write_text(json.dumps({"metadata_url": imds.url, "armed_at": time.time()}))
    marker = tmp_path / "FIRED"
    watcher.arm(root, 0.001, f"touch {marker}", Path(__file__).resolve().parents[2])  # starts its own watcher...
    wait_for(lambda: (root / layout.WATCHER_STATE).exists(), "the detached watcher")
    watcher.disarm(root)  # ...which goes on: spot watching is still set
    assert (root / layout.SPOT_SETTING).exists()
    # this test's own (in-process) watcher needs the lock: the detached one leaves once spot watching ends
    (root / layout.SPOT_SETTING).unlink()
    # (the event is its last word, then its lock: the lock alone may be free before it took it)
    wait_for(lambda: "no autostop or spot setting: the watcher exits" in (root / layout.WATCHER_LOG).read_text(),
             "the detached watcher to say it exits")
    wait_for(lambda: not watcher.is_locked(root / layout.WATCHER_LOCK), "the detached watcher to exit")

    root.joinpath(layout.SPOT_SETTING).write_text(json.dumps({"metadata_url": imds.url, "armed_at": time.time()}))
    monkeypatch.setattr(watcher, "SPOT_POLL", 0.2)  # the in-process watcher asks every 0.2 s, not 5
    thread, outcome = start_watcher(root)
    wait_for(lambda: imds.gets(ACTION) >= 1, "the first question")
    imds.rebalance("2026-11-21T10:00:00Z")
    wait_for(lambda: read_json(root / layout.WATCHER_STATE).get("rebalance_at"), "the rebalance")
    snap = Snapshot.from_json(snapshot(root / layout.RUNS_DIR / "r1", 0, 0).to_json())
    assert snap.rebalance_at == "2026-11-21T10:00:00Z"
    when = imds.notice("terminate")
    wait_for(lambda: (root / layout.RUNS_DIR / "r1" / layout.INTERRUPTION).exists(), "the interruption")
    asked = imds.gets(ACTION)
    wait_for(lambda: imds.gets(ACTION) >= asked + 3, "more questions")  # it goes on asking
    # armed autostop fires once the interrupted trainer has exited, and the watcher goes on
    # while spot watching is set
    (root / layout.RUNS_DIR / "r1" / layout.STATUS).write_text(json.dumps({"state": "interrupted"}))
    terms = trainer.terms()  # (a trainer alive after its final state keeps the machine busy: its upload)
    root.joinpath(layout.AUTOSTOP_SETTING).write_text(json.dumps({"idle_minutes": 0.001, "command": f"touch {marker}",
                                                                  "armed_at": time.time()}))
    wait_for(marker.exists, "autostop's command")
    assert thread.is_alive()
    imds.clear()  # a restarted instance: no recommendation any more, and none is shown
    wait_for(lambda: "rebalance_at" in read_json(root / layout.WATCHER_STATE)
             and read_json(root / layout.WATCHER_STATE)["rebalance_at"] is None, "the recommendation forgotten")
    (root / layout.SPOT_SETTING).unlink()
    thread.join(30)
    assert outcome == [0]
    assert terms == 1  # once, although the notice stayed posted for several questions
    log = (root / layout.WATCHER_LOG).read_text()
    assert f"terminate at {when}" in log and "EC2 recommends rebalancing since 2026-11-21T10:00:00Z" in log
    assert log.count("EC2 recommends rebalancing") == 1
    assert imds.tokenless_requests == 0


def test_the_trainer_reads_only_a_notice_written_after_it_started(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    start = time.time()
    assert stopping.interruption(run, start) is None
    old = {"action": "terminate", "notice_time": "2026-11-21T10:32:15Z", "noticed_at": start - 30}
    (run / layout.INTERRUPTION).write_text(json.dumps(old))
    assert stopping.interruption(run, start) is None  # kept: the watcher sees this notice was acted on
    fresh = old | {"noticed_at": start + 1}
    (run / layout.INTERRUPTION).write_text(json.dumps(fresh))
    notice = stopping.interruption(run, start)
    assert notice is not None and notice.action == "terminate" and notice.notice_time == "2026-11-21T10:32:15Z"
    for crafted in ({**fresh, "action": "rm -rf"}, {**fresh, "noticed_at": "soon"}, [1], {"noticed_at": start + 1}):
        (run / layout.INTERRUPTION).write_text(json.dumps(crafted))
        assert stopping.interruption(run, start) is None


def test_an_interrupted_runs_notice_reaches_orch_checked() -> None:
    status = {"state": "interrupted", "reason": layout.SPOT_INTERRUPTION,
              "interruption": {"action": "terminate", "notice_time": "2026-11-21T10:32:15Z", "noticed_at": 1.5}}
    run = RunInfo.from_json({"run_id": "r", **status})
    assert run.interruption == Interruption("terminate", "2026-11-21T10:32:15Z", 1.5)
    assert run.final and run.exit_code == 9 and run.reason == layout.SPOT_INTERRUPTION
    crafted = RunInfo.from_json({"run_id": "r", **status, "interruption": {"action": "terminate",
                                                                           "notice_time": "\x1b[2J" + "x" * 10}})
    assert crafted.interruption is None and crafted.state == "interrupted"  # the record defaults, the rest stays


def test_monitor_shows_the_interruption_and_the_rebalance_recommendation() -> None:
    from rich.console import Console

    from orchestrator.monitor import RunView

    view = RunView("r")
    view.update(Snapshot.from_json({
        "run": {"run_id": "r", "state": "interrupted", "alive": False, "epoch": 3, "epochs": 10,
                "interruption": {"action": "terminate", "notice_time": "2026-11-21T10:32:15Z", "noticed_at": 1.0}},
        "rebalance_at": "2026-11-21T10:00:00Z"}))
    console = Console(record=True, width=200)
    console.print(view.render())
    text = console.export_text()
    assert "interrupted by a spot notice (terminate at 2026-11-21T10:32:15Z)" in text
    assert "EC2 recommends rebalancing since 2026-11-21T10:00:00Z: this spot instance is at higher risk" in text
    assert "orch resume r --continue" in view.summary() and view.exit_code == 9
    doc = view.to_json()
    assert doc["interruption"]["action"] == "terminate" and doc["rebalance_at"] == "2026-11-21T10:00:00Z"


def test_a_watcher_whose_root_is_gone_exits(tmp_path: Path, imds: ImdsStandIn) -> None:
    import shutil

    root = tmp_path / "root"
    watcher.watch_spot(root, imds.url, Path(__file__).resolve().parents[2])  # starts a detached watcher
    wait_for(lambda: imds.gets(ACTION) >= 1, "its first question")
    pid = next(int(line.split("pid ")[1].rstrip(")")) for line in (root / layout.WATCHER_LOG).read_text().splitlines()
               if "watcher started" in line)
    shutil.rmtree(root)  # the settings with it: nothing is left to watch

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True

    wait_for(gone, "the watcher to exit", timeout=15)  # within one pause (5 s), not never
