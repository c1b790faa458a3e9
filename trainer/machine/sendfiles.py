"""A run's files for `orch download`, all through one command (verb ``send``):

    send ROOT SILENCE       stdin: requests, one a line

holds ROOT/activity.lock shared while it lives (as ``hold`` does: the autostop watcher never
calls the machine idle meanwhile), prints the frame line, then answers each request in turn
with one block (trainer/contract/blocks.py):

    files RUN_ID            the run's RunFiles (what ``files`` answers), as JSON
    get LIMIT RUN_ID/REL    at most LIMIT bytes of the file, moved by the kernel (sendfile)

Only a regular file is sent, reached from ROOT/runs without following a link (a run folder or
a file swapped for a link is refused); a file that shrinks while it is sent is padded with
zeros, so that the blocks after it stay in step (its checksum then tells orch it changed). EOF
on stdin ends it, and so do SILENCE seconds without a request, or without room to write an
answer (a laptop that vanished: its lock never keeps the machine up for longer). One
command, started while orch still connects, answers a whole download: one interpreter's start
and one connection instead of three. Standard library only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import select
import stat
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.blocks import MAX_BLOCK_ERROR, block_header, widen_pipe
from trainer.machine.locks import held
from trainer.machine.probe import run_files

BLOCK = 1 << 20
MAX_REQUEST = 8192  # bytes of one request line (a run id and a path inside the run: far less)


def open_below(root: Path, rel: str) -> int:
    """A read-only fd of the regular file ``root/rel``, no part of ``rel`` a link, ``..`` or empty."""
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise OSError(errno.EINVAL, "not a plain relative path")
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(root, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            below = os.open(part, flags | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = below
        # O_NONBLOCK: a named pipe in the file's place never waits for a writer
        found = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(found).st_mode):
        os.close(found)
        raise OSError(errno.EINVAL, "not a regular file")
    return found


class Stalled(Exception):
    """Nobody read what was sent for SILENCE seconds."""


# sendfile cannot write there (another kind of file, an old kernel): the plain way instead
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class Out:
    """The stream's fd, non-blocking: a write waits at most ``silence`` seconds for room."""

    def __init__(self, fd: int, silence: float) -> None:
        self.fd, self.silence = fd, silence
        os.set_blocking(fd, False)

    def _room(self) -> None:
        if not select.select([], [self.fd], [], self.silence)[1]:
            raise Stalled

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                self._room()

    def send(self, src: int, count: int) -> None:
        """``count`` bytes of ``src`` from its start, by the kernel; zeros for what it no longer has."""
        offset = 0
        while offset < count:
            want = min(BLOCK, count - offset)
            try:
                sent = os.sendfile(self.fd, src, offset, want)
            except BlockingIOError:
                self._room()
                continue
            except OSError as exc:
                if exc.errno not in _NO_SENDFILE:
                    raise
                data = os.pread(src, want, offset)
                self.write(data)
                sent = len(data)
            if sent == 0:  # the file shrank meanwhile
                self.write(bytes(want))
                sent = want
            offset += sent


def _error(dst: Out, message: str) -> None:
    data = message.encode()[:MAX_BLOCK_ERROR]
    dst.write(block_header(len(data), error=True) + data)


def _get(dst: Out, runs: Path, limit: int, rel: str) -> None:
    try:
        fd = open_below(runs, rel)
    except OSError as exc:
        _error(dst, f"cannot read {rel}: {exc.strerror or exc}")
        return
    try:
        count = min(os.fstat(fd).st_size, limit)
        dst.write(block_header(count))
        dst.send(fd, count)
    finally:
        os.close(fd)


def _files(dst: Out, runs: Path, run_id: str) -> None:
    if not run_id or "/" in run_id or run_id in (".", ".."):
        _error(dst, f"{run_id!r} is not a run id")
        return
    data = json.dumps(dataclasses.asdict(run_files(runs / run_id))).encode()
    dst.write(block_header(len(data)) + data)


def _answer(dst: Out, runs: Path, request: bytes) -> None:
    words = request.decode("utf-8", "replace").split(" ", 2)
    if words[0] == "files" and len(words) == 2:
        _files(dst, runs, words[1])
    elif words[0] == "get" and len(words) == 3 and words[1].isdigit():
        _get(dst, runs, int(words[1]), words[2])
    else:
        _error(dst, f"a malformed request {request[:80]!r}")


def serve(root: Path, silence: float, out: Any) -> int:
    root.mkdir(parents=True, exist_ok=True)
    with held(root / layout.ACTIVITY_LOCK, shared=True), contextlib.suppress(BrokenPipeError, Stalled):
        # Stalled, a broken pipe: orch went away (Ctrl-C, it had what it wanted, or it vanished)
        fd = out.stream()
        widen_pipe(fd)
        dst, pending = Out(fd, silence), b""
        while True:
            while b"\n" not in pending:  # the next request: read here, never more than orch sent
                if len(pending) > MAX_REQUEST or not select.select([0], [], [], silence)[0]:
                    return 0
                chunk = os.read(0, 1 << 16)
                if not chunk:
                    return 0
                pending += chunk
            request, _, pending = pending.partition(b"\n")
            _answer(dst, root / layout.RUNS_DIR, request)
    return 0


def run(verb: str, argv: list[str], out: Any) -> int:
    return serve(Path(argv[0]), float(argv[1]), out)
