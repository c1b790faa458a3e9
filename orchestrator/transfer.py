"""Bytes from the machine, as a framed stream: whatever the machine's shell prints before a
command's output (a login greeting, a noisy ~/.bashrc) is dropped up to the frame line
``\\n<FRAME> stream\\n`` the command prints first; what follows goes to a sink as it arrives,
or into a file, hashed on the way (never read twice)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

from orchestrator.errors import RemoteError
from orchestrator.remote import Progress, Sink, q
from trainer.contract.files import hash_stream
from trainer.contract.verbs import STREAM

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
        self.done += len(data)
        if self.progress is not None:
            self.progress(self.done)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def copy_hashing(src: Any, local: Path, progress: Progress | None) -> str:
    """``src`` (a readable file) into ``local``; its sha256."""
    with open(local, "wb") as out:
        writer = HashingWriter(out, progress)
        return hash_stream(src, on_block=lambda block: writer(block)).hexdigest()


def receive_file(pipe: int, frame: str, out: BinaryIO, progress: Progress | None, size: int | None = None) -> str:
    """A framed stream from the pipe ``pipe`` into ``out`` (open for reading too): the noise
    before the frame dropped, the rest moved by the kernel (splice: no copy through Python) and
    hashed from the page cache as it lands, at most ``size`` bytes (what the run listed; a little
    more, a shell's goodbye, is dropped; much more is refused). Returns the sha256 of what was
    written; RemoteError when no frame came."""
    writer = HashingWriter(out, progress)
    limit = size if size is not None else 1 << 62
    unframed = Unframed(frame, lambda data: writer(data[: max(0, limit - writer.done)]))
    while not unframed.found:
        chunk = os.read(pipe, 1 << 16)
        if not chunk:
            raise RemoteError("its output never began (no frame line)")
        unframed.feed(chunk)
    out.flush()
    fd = out.fileno()
    while writer.done < limit and (n := _move(pipe, fd, min(BLOCK, limit - writer.done))):
        writer.h.update(os.pread(fd, n, writer.done))
        writer.done += n
        if progress is not None:
            progress(writer.done)
    extra = 0
    while chunk := os.read(pipe, 1 << 16):  # after the file: at most a shell's goodbye
        extra += len(chunk)
        if extra > MAX_NOISE:
            raise RemoteError(f"the file is bigger than the {size} bytes the run listed")
    return writer.hexdigest()


def _move(pipe: int, fd: int, count: int) -> int:
    """Up to ``count`` bytes from the pipe into the file: by the kernel where it can (splice)."""
    if hasattr(os, "splice"):
        try:
            return os.splice(pipe, fd, count)
        except OSError:  # a file system without splice (some FUSE mounts): the plain way
            pass
    data = os.read(pipe, count)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)
