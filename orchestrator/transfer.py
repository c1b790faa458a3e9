"""Bytes from the machine, as a framed stream: whatever the machine's shell prints before a
command's output (a login greeting, a noisy ~/.bashrc) is dropped up to the frame line
``\\n<FRAME> stream\\n`` the command prints first; what follows goes to a sink as it arrives,
or into files: a download's files come as sized blocks over one OpenSSH session
(:class:`FileStream`, trainer/contract/blocks.py), each spliced into its file by the kernel
and hashed from the page cache as it lands (never read twice)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from orchestrator.errors import RemoteError
from orchestrator.remote import MAX_LINE, Progress, Sink, q
from trainer.contract.blocks import BLOCK_HEADER, parse_block_header
from trainer.contract.files import hash_stream
from trainer.contract.verbs import STREAM

if TYPE_CHECKING:
    from orchestrator.ssh import BulkSession

MAX_NOISE = 1 << 20  # what a shell may print before the frame; more, and the stream is refused
BLOCK = 1 << 20


def new_frame() -> str:
    return secrets.token_hex(12)


def framed(frame: str, command: str) -> str:
    """A shell command whose output is ``command``'s, preceded by its frame line."""
    return f"printf '\\n%s {STREAM}\\n' {q(frame)} && {command}"


class Unframed:
    """A sink for a framed stream: it drops what comes before the frame, passes the rest on."""

    def __init__(self, frame: str, sink: Sink) -> None:
        self.mark = f"\n{frame} {STREAM}\n".encode()
        self.sink, self.head, self.found = sink, bytearray(), False

    def feed(self, chunk: bytes) -> None:
        if self.found:
            self.sink(chunk)
            return
        self.head += chunk
        at = self.head.find(self.mark)
        if at < 0:
            if len(self.head) > MAX_NOISE + len(self.mark):
                raise RemoteError(f"the machine's shell printed more than {MAX_NOISE >> 20} MB before the "
                                  "command's output; check its start-up files (~/.bashrc)")
            return
        self.found = True
        rest, self.head = bytes(self.head[at + len(self.mark):]), bytearray()
        if rest:
            self.sink(rest)


class HashingWriter:
    """A sink into a file: written, counted and hashed as it arrives."""

    def __init__(self, out: BinaryIO, progress: Progress | None) -> None:
        self.out, self.progress, self.h, self.done = out, progress, hashlib.sha256(), 0

    def __call__(self, data: bytes) -> None:
        self.out.write(data)
        self.h.update(data)
        self._count(len(data))

    def landed(self, n: int) -> None:
        """``n`` more bytes the kernel wrote into the file (which began empty): hashed from the page cache."""
        self.h.update(os.pread(self.out.fileno(), n, self.done))
        self._count(n)

    def _count(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def copy_hashing(src: Any, local: Path, progress: Progress | None) -> str:
    """``src`` (a readable file) into ``local``; its sha256."""
    with open(local, "wb") as out:
        writer = HashingWriter(out, progress)
        return hash_stream(src, on_block=lambda block: writer(block)).hexdigest()


class FramedPipe:
    """The read end of a framed stream (a pipe from OpenSSH): the noise before the frame
    dropped, the rest read as it comes, or moved by the kernel into a file."""

    def __init__(self, pipe: int, frame: str) -> None:
        self.pipe, self.frame = pipe, frame
        self.pending = bytearray()  # what came with the frame line, not yet read
        self.begun = self.ended = False  # ended: the writer closed its end

    def begin(self) -> None:
        """Read up to the frame line (RemoteError when none comes)."""
        if self.begun:
            return
        unframed = Unframed(self.frame, self.pending.extend)
        while not unframed.found:
            chunk = os.read(self.pipe, 1 << 16)
            if not chunk:
                self.ended = True
                raise RemoteError("its output never began (no frame line)")
            unframed.feed(chunk)
        self.begun = True

    def read(self, n: int) -> bytes:
        """``n`` bytes; fewer only where the stream ended."""
        while len(self.pending) < n:
            chunk = os.read(self.pipe, max(n - len(self.pending), 1 << 16))
            if not chunk:
                self.ended = True
                break
            self.pending += chunk
        data = bytes(self.pending[:n])
        del self.pending[:n]
        return data

    def into(self, writer: HashingWriter, count: int) -> int:
        """Up to ``count`` bytes into ``writer``'s file, hashed as they land: by the kernel
        (splice: no copy through Python) but for what was read already. 0: the stream ended."""
        if self.pending:
            data = bytes(self.pending[:count])
            del self.pending[: len(data)]
            writer(data)
            return len(data)
        writer.out.flush()
        n = _move(self.pipe, writer.out.fileno(), min(BLOCK, count))
        if n:
            writer.landed(n)
        self.ended = n == 0
        return n


class Unsendable(RemoteError):
    """The machine said why it cannot send a file (the stream goes on)."""


class FileStream:
    """A download through one session of the ``send`` verb (trainer/machine/sendfiles.py): one
    request, one block back (trainer/contract/blocks.py), in turn: the run's list of files, then
    each file. Dropped at the end without waiting for a goodbye (every file is checked already;
    the machine's side ends with its stdin)."""

    def __init__(self, session: BulkSession, frame: str) -> None:
        self.session, self.stream = session, FramedPipe(session.stdout, frame)
        self.broken = False

    def fetch(self, rel: str, local: Path, progress: Progress | None, size: int) -> str:
        """``rel`` (RUN_ID/PATH) into ``local`` (a new temp file), at most ``size`` bytes (what
        the run listed); the sha256 of what arrived."""
        too_big = f"{rel} is bigger than the {size} bytes the run listed"
        with open(local, "w+b") as out:
            writer = HashingWriter(out, progress)
            with self._block(f"get {size} {rel}", size, too_big) as length:
                while writer.done < length:
                    if not self.stream.into(writer, length - writer.done):
                        raise RemoteError(f"its output ended inside {rel}")
        return writer.hexdigest()

    def record(self, request: str) -> Any:
        """The JSON the machine answers ``request`` with (a record: its reader checks it)."""
        with self._block(request, MAX_LINE, f"its answer is bigger than {MAX_LINE >> 20} MB") as length:
            data = self.stream.read(length)
            if len(data) < length:
                raise RemoteError("its output ended inside its answer")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise RemoteError(f"{self.session.what} failed on {self.session.host}: its answer is not JSON") from exc

    @contextlib.contextmanager
    def _block(self, request: str, limit: int, too_big: str) -> Iterator[int]:
        """Ask ``request``; the length of the block that answers it (at most ``limit``, else
        ``too_big``), to be read in the block. The stream is out of step (and no longer used)
        unless it all was."""
        if self.broken:
            raise RemoteError(f"the transfer from {self.session.host} broke off earlier")
        self.broken = True
        self.session.write(request.encode() + b"\n")
        try:
            self.stream.begin()
            header = self.stream.read(BLOCK_HEADER)
            parsed = parse_block_header(header)
            if parsed is None:
                raise RemoteError("its output ended" if len(header) < BLOCK_HEADER else "it sent something else "
                                  "than a block")
            size, error = parsed
            if error:
                reason = self.stream.read(size)
                self.broken = len(reason) < size
                raise Unsendable(f"{self.session.what} failed on {self.session.host}: "
                                 f"{reason.decode(errors='replace')}")
            if size > limit:
                raise RemoteError(too_big)
            yield size
        except Unsendable:
            raise
        except RemoteError as exc:
            raise self.session.failed(str(exc), ended=self.stream.ended) from exc
        self.broken = False


_NO_SPLICE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _move(pipe: int, fd: int, count: int) -> int:
    """Up to ``count`` bytes from the pipe into the file: by the kernel where it can (splice)."""
    if hasattr(os, "splice"):
        try:
            return os.splice(pipe, fd, count)
        except OSError as exc:  # a file system without splice (some FUSE mounts): the plain way
            if exc.errno not in _NO_SPLICE:
                raise  # a full disk, an I/O error: as it is, before a byte more is taken off the stream
    data = os.read(pipe, count)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)
