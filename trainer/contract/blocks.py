"""A run's files as sized blocks, for `orch download`: the format (both halves) and the
machine's sender. orch runs this file's text, after the stream's frame line
(orchestrator/transfer.py: framed), as

    python3 -I -S -c "<this file>" RUNS_DIR

with requests on stdin, one a line: ``LIMIT RUN_ID/REL``. After the frame line the sender
answers each request in turn with one block: a header of BLOCK_HEADER ASCII bytes, then the
bytes it announces: b"%020d" (that many bytes of the file: at most LIMIT) or b"E%019d" (the
file cannot be sent: a message of that many bytes). Only a regular file is sent, reached from
RUNS_DIR without following a link (a run folder or a file swapped for a link is refused), moved
by the kernel (sendfile); a file that shrinks while it is sent is padded with zeros, so that the
blocks after it stay in step (its checksum then tells orch it changed). EOF on stdin ends it.

It is bulk data, like the tar stream of an upload: no bundle and no verb, because their
start-up (the bundle, the records' imports) would cost more than a download's wait for its
first byte; orch opens its connection while the machine still lists the run's files.
Standard library only, and no backslash anywhere (fish reads some inside single quotes).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

BLOCK_HEADER = 20
MAX_BLOCK_ERROR = 4096  # bytes of an error message
MAX_REQUEST = 8192  # bytes of one request line (a run id and a path inside the run: far less)
BLOCK = 1 << 20


def widen_pipe(fd: int) -> None:
    """Make ``fd``'s pipe hold 1 MiB where the system lets it (Linux): the program at its other
    end goes on while this one is busy (hashing, writing a file), in fewer, larger steps."""
    try:
        import fcntl

        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass


def block_header(size: int, *, error: bool = False) -> bytes:
    return (b"E%019d" if error else b"%020d") % size


def parse_block_header(raw: bytes) -> tuple[int, bool] | None:
    """(size, whether it announces an error message) of a block header; None if it is not one."""
    error = raw[:1] == b"E"
    digits = raw[1:] if error else raw
    if len(raw) != BLOCK_HEADER or not digits.isdigit() or (error and int(digits) > MAX_BLOCK_ERROR):
        return None
    return int(digits), error


def open_below(root: str, rel: str) -> int:
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


def send_exactly(src: int, dst: int, count: int) -> None:
    """``count`` bytes of ``src`` from its start into ``dst``; zeros for what it no longer has."""
    offset = 0
    while offset < count:
        want = min(BLOCK, count - offset)
        try:
            sent = os.sendfile(dst, src, offset, want)
        except OSError:  # a destination sendfile cannot write to: the plain way
            sent = _write_all(dst, os.pread(src, want, offset))
        if sent == 0:  # the file shrank meanwhile
            sent = _write_all(dst, bytes(want))
        offset += sent


def _write_all(dst: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(dst, view):]
    return len(data)


def _answer(dst: int, runs_dir: str, request: bytes) -> None:
    limit_text, _, rel = request.decode("utf-8", "replace").rstrip().partition(" ")
    try:
        limit = int(limit_text)
        if limit < 0:
            raise ValueError
        fd = open_below(runs_dir, rel)
    except ValueError:
        _error(dst, f"a malformed request {request[:80]!r}")
        return
    except OSError as exc:
        _error(dst, f"cannot read {rel}: {exc.strerror or exc}")
        return
    try:
        count = min(os.fstat(fd).st_size, limit)
        _write_all(dst, block_header(count))
        send_exactly(fd, dst, count)
    finally:
        os.close(fd)


def _error(dst: int, message: str) -> None:
    data = message.encode()[:MAX_BLOCK_ERROR]
    _write_all(dst, block_header(len(data), error=True) + data)


def serve(runs_dir: str) -> int:
    """Answer the requests on stdin, blocks on stdout, to the end of stdin."""
    dst = sys.stdout.fileno()
    widen_pipe(dst)
    try:
        while request := sys.stdin.buffer.readline(MAX_REQUEST):
            _answer(dst, runs_dir, request)
    except BrokenPipeError:  # orch went away (Ctrl-C, or it had what it wanted)
        pass
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
