"""What the machine sends is untrusted input (issue: framed answers, bounded sizes, clean
terminals, readers that cannot hang or crash). A crafted machine, on the local target: escape
sequences in every field it sends, wrong types, NaN and Infinity, a FIFO in a file's place, a
nvidia-smi printing garbage; every command stays one clean line or table, never a traceback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.context import Output
from orchestrator.errors import RemoteError
from orchestrator.ssh import BulkSession
from orchestrator.transfer import FileStream, Unsendable
from tests.servers import peak_rss
from trainer.contract import layout
from trainer.contract.wire import RunFiles, RunInfo
from trainer.machine.locks import is_locked
from trainer.machine.proc import pid_line

UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]")
ESC = "\x1b]0;owned\x07\x1b[2J\x1b]52;c;SGVsbG8=\x07\x9b31m\u202e"


@pytest.fixture
def evil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    root = tmp_path / "root"
    run = root / "runs" / f"evil{ESC}run"
    run.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    (run / layout.PID_FILE).write_text(pid_line(sleeper.pid))
    (run / layout.STATUS).write_text(json.dumps({
        "state": "running", "epoch": "three", "epochs": 10, "best_val_accuracy": "high", "best_epoch": [1],
        "error": f"boom {ESC}", "phase": ESC, "updated_at": ESC}))
    (run / layout.RUN_JSON).write_text(json.dumps({"started_at": ESC, "parent_run": {"x": 1}}))
    (run / layout.METRICS).write_text('{"epoch": 1, "loss": Infinity, "val_accuracy": NaN}\n'
                                      '{"epoch": 2, "loss": 1.5}\nnot json\n[1, 2]\n'
                                      '{"epoch": 3, "loss": 1.2, "val_accuracy": 0.4, "seconds": "x"}\n')
    (run / layout.TRAIN_LOG).write_bytes(f"line {ESC}\n".encode() + b"\xff\xfe bytes\n" + b"x" * 100_000)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text("#!/bin/sh\nprintf '0, Tesla\\033]0;gpu\\007 T4, 10, 100, 15360, 40, 30\\n'\n"
                                      "printf '\\377\\376 \\342\\202\\203, x, 1, 2, 3, 4, 5\\n'\n")
    (tools / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(f"target: local\nremote:\n  root: {root}\n  python: {sys.executable}\n")
    yield {"cfg": cfg, "root": root, "run": run}
    sleeper.kill()
    sleeper.wait()


def orch(*args: str) -> tuple[int, str]:
    output = Output.captured()
    code = main(list(args), output)
    return code, output.out.file.getvalue() + output.err.file.getvalue()


@pytest.mark.parametrize("argv", [["runs"], ["monitor", "evil", "--once"], ["status"], ["logs", "evil"],
                                  ["stop", "nope"], ["download", "evil"]])
def test_no_escape_sequence_reaches_the_terminal(evil: dict, argv: list[str]) -> None:
    code, text = orch(*argv, "-c", str(evil["cfg"]))
    assert code != 1 and "unexpected" not in text and "Traceback" not in text, text
    assert not UNSAFE.search(text), repr(UNSAFE.findall(text))
    assert "\\x1b" in text or argv[0] in ("stop", "download"), text  # shown, escaped


@pytest.mark.parametrize("argv", [["runs", "--json"], ["monitor", "evil", "--json"], ["status", "--json"]])
def test_json_output_is_exact_and_inert(evil: dict, argv: list[str]) -> None:
    code, text = orch(*argv, "-c", str(evil["cfg"]))
    assert code == 0 and not UNSAFE.search(text), text
    doc = json.loads(text)
    found = json.dumps(doc)
    assert "boom \\u001b]0;owned\\u0007" in found or "evil\\u001b" in found  # the data itself, exact


def test_crafted_fields_default_and_the_run_is_read(evil: dict) -> None:
    code, text = orch("monitor", "evil", "--json", "-c", str(evil["cfg"]))
    doc = json.loads(text)
    assert code == 0 and doc["state"] == "running" and doc["epoch"] is None and doc["best_val_accuracy"] is None
    assert doc["val_accuracy"] == 0.4  # the last valid row; NaN/Infinity and junk lines never crash
    assert doc["error"].startswith("boom \x1b]0;owned")  # data is kept as sent, JSON-escaped on output
    assert all(len(line) < 5000 for line in doc["log_tail"])  # a 100 KB line is cut (and says so)
    assert any("more bytes cut" in line for line in doc["log_tail"])
    assert [g["name"] for g in doc["gpus"]] == ["Tesla\x1b]0;gpu\x07 T4"]  # the garbage row is left out


def test_a_fifo_in_place_of_a_run_file_is_a_broken_run_not_a_hang(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in (layout.STATUS, layout.RUN_JSON, layout.PID_FILE, layout.METRICS, layout.TRAIN_LOG):
        run = root / "runs" / f"fifo-{name.replace('.', '-')}"
        run.mkdir(parents=True)
        os.mkfifo(run / name)
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(f"target: local\nremote:\n  root: {root}\n  python: {sys.executable}\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "runs", "--json", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    runs = json.loads(proc.stdout)
    assert proc.returncode == 0 and len(runs) == 5 and {r["state"] for r in runs} == {"broken"}, proc.stderr
    assert all("is not a regular file (named pipe)" in r["broken"] for r in runs)
    for run in runs:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "monitor", run["run_id"], "-c", str(cfg)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 7 and "broken" in proc.stdout, proc.stdout + proc.stderr


def test_a_terminal_that_cannot_show_unicode(evil: dict) -> None:
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "monitor", "evil", "--once", "-c", str(evil["cfg"])],
                          capture_output=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.isascii() and b"unexpected" not in proc.stderr


def test_a_huge_log_without_newlines_is_bounded_everywhere(tmp_path: Path) -> None:
    """A sparse 1 GB train.log of NUL bytes, no newline: monitor reads its last bytes only, and
    `orch logs` streams a 32 MB one in flat memory, every NUL shown escaped."""
    root = tmp_path / "root"
    run = root / "runs" / "huge"
    run.mkdir(parents=True)
    (run / layout.STATUS).write_text('{"state": "finished", "epoch": 1, "epochs": 1}')
    with open(run / layout.TRAIN_LOG, "wb") as fh:
        fh.truncate(1 << 30)
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(f"target: local\nremote:\n  root: {root}\n  python: {sys.executable}\n")
    code, text = orch("monitor", "huge", "--json", "-c", str(cfg))
    assert code == 0 and len(text) < 50_000 and "more bytes cut" in text
    with open(run / layout.TRAIN_LOG, "r+b") as fh:
        fh.truncate(32 << 20)
    code, rss, err = peak_rss([sys.executable, "-m", "orchestrator", "logs", "huge", "-c", str(cfg)],
                              str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out").stat().st_size == 4 * (32 << 20)  # each NUL as the 4 characters \x00
    with open(tmp_path / "out", "rb") as fh:
        assert b"\0" not in fh.read(1 << 20)
    assert rss < 200_000, rss  # KB: the whole log (32 MB, 128 MB escaped) was never held


def local(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "runs").mkdir(parents=True)
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(f"target: local\nremote:\n  root: {root}\n  python: {sys.executable}\n")
    return root, cfg


def test_a_run_that_failed_on_a_full_disk_ends_monitor_with_14(tmp_path: Path) -> None:
    root, cfg = local(tmp_path)
    (root / "runs" / "full").mkdir()
    (root / "runs" / "full" / layout.STATUS).write_text(json.dumps({"state": "failed", "reason": layout.DISK_FULL,
                                                                    "error": "no space left on device on /x"}))
    (root / "runs" / "other").mkdir()
    (root / "runs" / "other" / layout.STATUS).write_text(json.dumps({"state": "failed", "error": "NaN loss"}))
    assert orch("monitor", "full", "-c", str(cfg))[0] == 14
    assert orch("monitor", "other", "-c", str(cfg))[0] == 8


def test_a_run_folder_that_is_a_link_elsewhere_is_never_followed(tmp_path: Path) -> None:
    root, cfg = local(tmp_path)
    elsewhere = tmp_path / "secrets"
    elsewhere.mkdir()
    (elsewhere / layout.TRAIN_LOG).write_text("api key: hunter2\n")
    (root / "runs" / "link").symlink_to(elsewhere)
    code, text = orch("logs", "link", "-c", str(cfg))
    assert code == 7 and "hunter2" not in text and "not a run folder of its own" in text
    code, text = orch("runs", "--json", "-c", str(cfg))
    assert json.loads(text)[0]["state"] == "broken"


def test_a_huge_config_file_is_refused_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text("target: local\n" + "# padding\n" * 200_000)
    code, text = orch("config", "check", "-c", str(cfg))
    assert code == 2 and "too big for a configuration file" in text and text.count("\n") == 1


def test_a_disk_full_while_the_env_is_built_is_exit_14(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from trainer.machine import envsetup

    def full(*_a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(envsetup, "_create", full)
    answers: list[object] = []
    channel = type("Channel", (), {"answer": lambda self, a: answers.append(a), "progress": lambda self, t: None})()
    assert envsetup.run("env", [str(tmp_path / "envs"), "--requirements", "numpy\n"], channel) == 1
    assert answers[0].disk_full  # type: ignore[attr-defined]
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(f"target: local\nremote:\n  root: {tmp_path / 'root'}\n  env: {{mode: managed}}\n")
    # The machine says so; orch says it as the one disk-full line, exit 14.
    from orchestrator.machine import Answer, Machine
    from orchestrator.remote import Result

    monkeypatch.setattr(Machine, "ask", lambda self, verb, *a, **k: Answer(Result(1, "", ""), {"disk_full": True}))
    code, text = orch("deploy", "-c", str(cfg))
    assert code == 14 and "no space left on device" in text and "python3-venv" not in text


def test_doctor_finds_a_remote_root_it_cannot_write(tmp_path: Path) -> None:
    from trainer.machine.preflight import disk

    assert disk(tmp_path / "not" / "yet").writable  # its nearest existing parent is ours
    assert not disk(Path("/proc/orch-root")).writable  # not even root can create files there


@pytest.mark.parametrize("script, gpus, error", [
    ("yes '0, Flood, 1, 2, 3, 4, 5' | head -n 2000000", 0, "printed too much"),  # 2 M lines
    ("sleep 120", 0, "ran too long"),  # a hung driver
    ("for i in $(seq 0 99); do echo \"$i, G$i, 1, 2, 3, 4, 5\"; done", 64, None),  # more GPUs than any box
])
def test_nvidia_smi_gets_a_bounded_time_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str,
                                                 gpus: int, error: str | None) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (tools / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    root, cfg = local(tmp_path)
    code, text = orch("status", "--json", "-c", str(cfg))
    host = json.loads(text)["machine"]["host"]
    assert code == 0 and len(host["gpus"]) == gpus
    assert (error is None and host["gpu_error"] is None) or error in host["gpu_error"]


FRAME = "f00d"


@contextlib.contextmanager
def file_stream(argv: list[str]) -> Iterator[FileStream]:
    """A download's file stream (orchestrator/transfer.py) from a machine side run here."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    session = BulkSession(proc, "crafted", "reading the run's files", b"")
    try:
        yield FileStream(session, FRAME)
    finally:
        session.kill()


def test_the_machine_sends_only_plain_files_of_the_runs_folder(tmp_path: Path) -> None:
    runs = tmp_path / layout.RUNS_DIR
    (runs / "r").mkdir(parents=True)
    (runs / "other").mkdir()
    data = os.urandom(3000)
    (runs / "r" / "ok.bin").write_bytes(data)
    (runs / "other" / "secret").write_bytes(b"secret")
    (runs / "r" / "link").symlink_to(runs / "other" / "secret")
    (runs / "linked").symlink_to(runs / "other")
    os.mkfifo(runs / "r" / "fifo")
    got = tmp_path / "got"
    with file_stream([sys.executable, "-m", "trainer.machine", FRAME, "send", str(tmp_path), "30"]) as stream:
        listed = stream.record("files r")  # what `files` answers: regular files only, links not followed
        assert listed["files"] == {"ok.bin": len(data)} and listed["run"]["run_id"] == "r"
        assert is_locked(tmp_path / layout.ACTIVITY_LOCK, shared_too=True)  # the machine is busy meanwhile
        for rel in ("r/link", "linked/secret", "r/../other/secret", "/etc/passwd", "r/fifo", "r/missing"):
            with pytest.raises(Unsendable, match="cannot read"):  # the stream goes on after each
                stream.fetch(rel, got, None, 100)
        assert stream.fetch("r/ok.bin", got, None, len(data)) == hashlib.sha256(data).hexdigest()
        assert stream.fetch("r/ok.bin", got, None, 10) == hashlib.sha256(data[:10]).hexdigest()  # the size listed
        assert got.read_bytes() == data[:10]
    assert not is_locked(tmp_path / layout.ACTIVITY_LOCK, shared_too=True)  # its end lets go


# A machine side that answers every request with the next of argv's blocks (hex), then ends.
CRAFTED = ("import sys\nsys.stdout.buffer.write(b'a noisy shell\\n\\n" + FRAME + " stream\\n')\n"
           "for block in sys.argv[1:]:\n    sys.stdin.buffer.readline()\n"
           "    sys.stdout.buffer.write(bytes.fromhex(block)); sys.stdout.buffer.flush()\n")


@pytest.mark.parametrize("block, problem", [
    (b"%020d" % (1 << 40) + b"x" * 100, "bigger than the 100 bytes"),
    (b"not a header at all, but a long line", "something else than a block"),
    (b"%020d" % 50 + b"x" * 10, "ended inside r/best"),
    (b"E%019d" % (1 << 30), "something else than a block"),
], ids=["more than listed", "no header", "cut short", "huge message"])
def test_a_crafted_file_stream_is_refused(tmp_path: Path, block: bytes, problem: str) -> None:
    ok = b"%020d" % 3 + b"abc"
    with file_stream([sys.executable, "-c", CRAFTED, ok.hex(), block.hex()]) as stream:
        assert stream.fetch("r/first", tmp_path / "first", None, 100) == hashlib.sha256(b"abc").hexdigest()
        with pytest.raises(RemoteError, match=problem):
            stream.fetch("r/best", tmp_path / "best", None, 100)
        assert (tmp_path / "best").stat().st_size <= 100
        with pytest.raises(RemoteError, match="broke off"):  # out of step: never read on
            stream.fetch("r/next", tmp_path / "next", None, 100)


def test_a_sender_nobody_reads_lets_the_machine_go(tmp_path: Path) -> None:
    """A laptop that vanished mid-download (its connection stalled, not closed): the machine's
    sender gives up once it has had no room to write for SILENCE seconds, and lets go of the
    activity lock, so autostop is never kept waiting by it."""
    run = tmp_path / layout.RUNS_DIR / "r"
    run.mkdir(parents=True)
    with open(run / "big", "wb") as fh:
        fh.truncate(64 << 20)  # sparse: far more than any pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "trainer.machine", FRAME, "send", str(tmp_path), "0.5"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"get 67108864 r/big\n")
        proc.stdin.flush()
        assert proc.stdout.read(4096)  # it sends; then nobody reads on
        assert is_locked(tmp_path / layout.ACTIVITY_LOCK, shared_too=True)
        assert proc.wait(timeout=120) == 0  # stdin still open: only the stall ends it
        assert not is_locked(tmp_path / layout.ACTIVITY_LOCK, shared_too=True)
    finally:
        proc.kill()
        proc.wait()


class AnsweringFor:
    """A source whose answer about a run names another run (a crafted machine or bucket)."""

    where = "the machine"

    def __init__(self, named: str) -> None:
        self.named = named

    def files(self, run_id: str) -> RunFiles:
        return RunFiles(manifest="", files={".bashrc": 1}, run=RunInfo(run_id=self.named))


@pytest.mark.parametrize("named", ["../..", "..", "/etc", "other-run"])
def test_a_download_never_takes_its_folder_name_from_an_answer_about_another_run(named: str) -> None:
    from orchestrator.download import _files_of

    with pytest.raises(RemoteError, match="answered for run"):
        _files_of(AnsweringFor(named), "20261201-101500-ab12")
    assert _files_of(AnsweringFor("20261201-101500-ab12"), "20261201-101500-ab12").run is not None
