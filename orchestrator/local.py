"""``target: local``: the machine is this computer; the same shell commands, run by /bin/sh."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from orchestrator.errors import RemoteError
from orchestrator.remote import (
    SESSION_EXIT_WAIT,
    Background,
    Progress,
    Reader,
    Remote,
    Session,
    Streams,
    Writer,
    feed,
    shell_status,
)
from orchestrator.transfer import copy_hashing


class _LocalBackground(Background):
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class _LocalSession(_LocalBackground, Session):
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        _LocalBackground.__init__(self, proc)
        Session.__init__(self)
        self.errors = _drain_in_thread(proc.stderr, self.streams.err)  # type: ignore[arg-type]

    def read(self, timeout: float) -> bytes | None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        if not select.select([fd], [], [], timeout)[0]:
            return None
        return os.read(fd, 1 << 16)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=SESSION_EXIT_WAIT)
        except subprocess.TimeoutExpired:  # deaf to its stdin's end: it must not outlive orch
            self.proc.kill()
            self.proc.wait()
        self.errors.join()
        self.proc.stdout.close()  # type: ignore[union-attr]


def _drain_in_thread(pipe: BinaryIO, sink: Callable[[bytes], None]) -> threading.Thread:
    """Read ``pipe`` to its end in a thread, each chunk to ``sink`` as it comes (so it never fills up)."""
    chunks = iter(lambda: pipe.read1(1 << 16), b"")  # type: ignore[attr-defined]
    reader = threading.Thread(target=lambda: [sink(c) for c in chunks], daemon=True)
    reader.start()
    return reader


def _run_to_end(proc: subprocess.Popen[bytes], streams: Streams, timeout: float | None = None,
                before: Callable[[], None] | None = None, group: bool = False) -> int:
    """``before()`` (feeding its stdin), then its stdout read here and its stderr in a thread, both
    as they come (neither pipe can fill up and block the other), to its exit; killed if anything
    fails (``group``: with every process of its own process group, which may hold its pipes)."""
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None
    reader = _drain_in_thread(stderr, streams.err)
    try:
        if before is not None:
            before()
        for chunk in iter(lambda: stdout.read1(1 << 16), b""):
            streams.out(chunk)
        proc.wait(timeout=timeout)
    except BaseException:
        if group:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join()
    return proc.returncode


class LocalRemote(Remote):
    def __init__(self, cwd: Path) -> None:
        self.host = "localhost"
        self.cwd = cwd

    def _exec(self, command: str, write: Writer | None, timeout: float | None, streams: Streams) -> int:
        proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=self.cwd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdin = proc.stdin
        assert stdin is not None

        def send() -> None:
            try:
                if write is not None:
                    write(stdin)  # type: ignore[arg-type]
            except BrokenPipeError:
                pass  # the command exited early; its exit code and stderr say why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    stdin.close()

        return _run_to_end(proc, streams, timeout, send)

    def interact(self, command: str, stdin: Reader | None, streams: Streams) -> int:
        # A session of its own, as on a machine over SSH: what orch stops (Ctrl-C, its output
        # closed) goes with everything the command started.
        proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=self.cwd,
                                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        if stdin is not None and proc.stdin is not None:  # fed meanwhile: a command may answer before its input ends
            pipe = proc.stdin

            def write(chunk: bytes) -> None:
                pipe.write(chunk)
                pipe.flush()

            threading.Thread(target=feed, args=(stdin, write, pipe.close), daemon=True).start()
        return shell_status(_run_to_end(proc, streams, group=True))

    def start(self, command: str) -> Background:
        return _LocalBackground(subprocess.Popen(["/bin/sh", "-c", command], cwd=self.cwd, stdin=subprocess.PIPE,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def session(self, command: str) -> Session:
        return _LocalSession(subprocess.Popen(["/bin/sh", "-c", command], cwd=self.cwd, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    def fetch(self, path: str, local: Path, progress: Progress | None = None, size: int | None = None) -> str:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # never a pipe, device or link
            with open(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise RemoteError(f"cannot read {path}: not a regular file")
                if size is not None and os.fstat(fd).st_size > size:
                    raise RemoteError(f"{path} is bigger than the {size} bytes the run listed")
                return copy_hashing(src, local, progress)
        except OSError as exc:
            raise RemoteError(f"cannot read {path}: {exc.strerror}") from exc
