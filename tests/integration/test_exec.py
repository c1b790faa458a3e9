"""`orch exec`, `orch ssh` and `orch tensorboard` against the loopback sshd (and `target: local`):
output streamed, exit codes and piped stdin passed through, a shell in remote.root, the host-key
policy, and one TensorBoard reached through the SSH connection, shared, and gone at the end.
(A stopped instance is refused: tests/integration/test_cost.py.)"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.context import Context, Output
from orchestrator.tboard import Board as BoardShown
from orchestrator.tboard import Ended, serve
from tests.integration.conftest import Sshd, keygen, write_config
from tests.integration.trainer_proc import signal_ended, trainer_env
from tests.servers import free_port
from trainer.contract import layout
from trainer.ml.tbevents import EventFiles

pytestmark = pytest.mark.slow


def config(tmp_path: Path, sshd: Sshd | None) -> Path:
    """deploy.yaml for the sshd (its host key trusted) or, without one, for target local."""
    remote = {"root": str(tmp_path / "remote"), "python": sys.executable}
    if sshd is None:
        return write_config(tmp_path / "deploy.yaml", target="local", remote=remote)
    (tmp_path / "known_hosts").write_text(sshd.known_hosts_line())
    return write_config(tmp_path / "deploy.yaml", target="ssh", remote=remote, ssh={
        "host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
        "key_file": str(sshd.client_key), "known_hosts": str(tmp_path / "known_hosts")})


def orch(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env())


@pytest.fixture(params=["local", "sshd"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return config(tmp_path, request.getfixturevalue("sshd") if request.param == "sshd" else None)


def test_exec_streams_forwards_piped_stdin_and_passes_the_exit_code(target: Path, tmp_path: Path) -> None:
    proc = orch("exec", "-c", target, "--", "sh", "-c", 'echo first; read x; echo "got $x"; pwd; echo oops >&2; exit 3')
    assert proc.stdout is not None
    assert proc.stdout.readline() == "first\n"  # shown while the command still waits for its input
    out, err = proc.communicate("hello\n", timeout=120)
    assert proc.returncode == 3, err
    assert out == f"got hello\n{tmp_path / 'remote'}\n"  # ... run in remote.root
    assert err == "oops\n"
    # one argument is a command line as it is (a pipe, a glob); a clean exit is exit 0
    output = Output.captured()
    assert main(["exec", "-c", str(target), "printf 'a\\nb\\n' | wc -l"], output=output) == 0
    assert output.out.file.getvalue().strip() == "2" and output.err.file.getvalue() == ""
    # its output into a pipe that closes early (`| head`): the command ends, orch says nothing, exit 141 as a
    # shell says it (not a failed connection)
    piped = subprocess.run(f"{sys.executable} -m orchestrator exec -c {target} -- seq 1 100000000 | head -2; "
                           "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True,
                           env=trainer_env(), timeout=120)
    assert (piped.returncode, piped.stdout, piped.stderr) == (141, "1\n2\n", "")
    deadline = time.monotonic() + 60  # a safety net: it ends at its next write into the closed channel
    while processes_naming("seq 1 100000000") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_naming("seq 1 100000000")


def test_ssh_opens_a_shell_in_remote_root(target: Path, tmp_path: Path) -> None:
    proc = orch("ssh", "-c", target)
    out, err = proc.communicate("pwd; exit 4\n", timeout=120)
    assert (proc.returncode, out) == (4, f"{tmp_path / 'remote'}\n"), err


def test_ssh_and_exec_refuse_a_host_key_that_is_not_the_known_one(tmp_path: Path, sshd: Sshd) -> None:
    cfg = config(tmp_path, sshd)
    other = keygen(tmp_path / "other_host_key").split()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    for command in (["ssh"], ["exec", "--", "touch", str(tmp_path / "ran")]):
        output = Output.captured()
        assert main([*command[:1], "-c", str(cfg), *command[1:]], output=output) == 5, command
        err = output.err.file.getvalue()
        assert "host key of 127.0.0.1" in err and "CHANGED" in err, (command, err)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "remote").exists()  # nothing ran there


# --------------------------------------------------------------------------- TensorBoard

def fake_run(root: Path, run_id: str, epochs: int) -> None:
    """A finished run's folder with its event files, as the trainer derives them (no training needed)."""
    run = root / layout.RUNS_DIR / run_id
    run.mkdir(parents=True)
    (run / layout.STATUS).write_text(json.dumps({"state": "finished", "epoch": epochs, "epochs": epochs}))
    EventFiles(run).publish([{"epoch": e, "loss": 1 / e, "accuracy": e / 10, "val_loss": 2 / e,
                              "val_accuracy": e / 20, "lr": 0.001} for e in range(1, epochs + 1)], 0)


def start_board(*args: str | Path) -> tuple[subprocess.Popen[str], str]:
    """`orch tensorboard ARGS` until it shows its URL (its first line)."""
    proc = orch("tensorboard", *args)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("TensorBoard at http://127.0.0.1:"), (line, proc.communicate(timeout=60))
    return proc, line


def end_board(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C, as a user ends it: exit 0 and its last line."""
    proc.send_signal(signal.SIGINT)
    out, err = signal_ended(proc, 120)
    assert proc.returncode == 0, err
    return out.strip().splitlines()[-1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.read().decode()


def refused(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    return False


def processes_naming(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in words:
            found.append(words.replace("\0", " ")[:200])
    return found


class Board(threading.Thread):
    """`orch tensorboard` in this process (its core, as the CLI calls it), until :meth:`end`."""

    def __init__(self, cfg: Path, *runs: str, keep: bool = False) -> None:
        super().__init__(daemon=True)
        self.ctx, self.runs, self.keep = Context(load_config(str(cfg))), runs, keep
        self.shown: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.ended: Ended | BaseException | None = None
        self.start()
        shown = self.shown.get(timeout=120)  # a safety net for a hang: it comes when it serves
        if isinstance(shown, BaseException):
            raise shown
        self.board: BoardShown = shown

    def run(self) -> None:
        try:
            self.ended = serve(self.ctx, self.runs, keep=self.keep, show=self.shown.put, until=self.stop)
        except BaseException as exc:
            self.ended = exc
            self.shown.put(exc)

    def end(self) -> Ended:
        self.stop.set()
        self.join(120)
        assert isinstance(self.ended, Ended), self.ended
        return self.ended


def test_tensorboard_through_the_ssh_connection_is_shared_and_leaves_nothing_behind(tmp_path: Path,
                                                                                    sshd: Sshd) -> None:
    cfg = config(tmp_path, sshd)
    root = tmp_path / "remote"
    fake_run(root, "alpha-1", 3)
    fake_run(root, "beta-1", 2)
    p1 = free_port()
    first, line = start_board("-c", cfg, "alpha", "--port", p1)  # the real command; a prefix names the run
    assert f"at http://127.0.0.1:{p1}/ (1 run: alpha-1; started on 127.0.0.1:{sshd.port}, forwarded" in line
    state = json.loads((root / layout.TENSORBOARD_STATE).read_text())
    assert state["port"] != p1  # on the machine it has a port of its own, on its 127.0.0.1
    assert "<!doctype html>" in get(f"http://127.0.0.1:{p1}/").lower()  # TensorBoard's page, through the tunnel
    # It reads the trainer's event files: steps are epochs, from 1 (TensorBoard loads them shortly after it starts)
    url = f"http://127.0.0.1:{p1}/data/plugin/scalars/scalars?run=alpha-1/validation&tag=epoch_accuracy"
    deadline = time.monotonic() + 120  # a safety net for a hang: the loop ends when TensorBoard has read them
    while time.monotonic() < deadline:
        try:
            points = json.loads(get(url))
            break
        except urllib.error.HTTPError:  # not loaded yet
            time.sleep(0.2)
    assert [step for _wall, step, _value in points] == [1, 2, 3]
    assert [round(value, 4) for *_, value in points] == [0.05, 0.1, 0.15]

    # a second command for the same runs reuses it (and may keep it)
    second = Board(cfg, "alpha-1", keep=True)
    assert second.board.reused and second.board.pid == state["pid"] and second.board.forwarded
    assert "<!doctype html>" in get(second.board.url).lower()
    # another set of runs while it is in use: refused, nothing disturbed
    output = Output.captured()
    assert main(["tensorboard", "-c", str(cfg), "beta-1"], output=output) == 6
    assert "serves alpha-1 to another `orch tensorboard`" in output.err.file.getvalue()
    assert end_board(first) == "TensorBoard left running: another `orch tensorboard` still uses it"
    assert refused(p1) and "<!doctype html>" in get(second.board.url).lower()
    assert second.end().fate == "kept"
    assert refused(int(second.board.url.rsplit(":", 1)[1].strip("/")))  # nothing forwards to it any more ...
    assert processes_naming(str(root / layout.RUNS_DIR))  # ... but it still runs there

    # the next command without --keep reuses it and stops it when it ends
    third = Board(cfg, "alpha-1")
    assert third.board.reused and third.board.pid == state["pid"]
    assert third.end().summary() == "TensorBoard stopped"
    assert not processes_naming(str(root / layout.RUNS_DIR)), "a TensorBoard survived"
    assert not (root / layout.TENSORBOARD_STATE).exists()
