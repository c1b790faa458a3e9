"""The transport: run a command on the training machine and move bytes, whatever the machine
is (orchestrator/local.py: this computer; orchestrator/ssh.py: over SSH).

Every implementation takes the same POSIX shell command strings, so everything above this
module works identically on ``target: local`` and on a real GPU box. Callers quote every
argument with :func:`q` (a leading ``~/`` with :func:`path_word`).
"""

from __future__ import annotations

import contextlib
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from orchestrator.errors import RemoteError

Writer = Callable[[BinaryIO], None]
Progress = Callable[[int], None]  # bytes received so far
Sink = Callable[[bytes], None]  # takes a command's stdout as it arrives
Reader = Callable[[], bytes]  # gives a command's stdin, a chunk at a time; b"": the end

# What the machine sends is untrusted: nothing of one command's output is held without a bound.
MAX_KEPT = 1 << 20  # stdout kept for a command whose output no sink reads
MAX_STDERR = 64 << 10  # the tail of stderr kept (what error messages quote)
MAX_LINE = 32 << 20  # one line (a framed answer: a run's file list is a few MB); the rest of a longer one is dropped
SESSION_EXIT_WAIT = 5.0  # seconds a closed Session's command gets to exit on its stdin's EOF


def q(word: str) -> str:
    """Quote one shell word (every remote argument goes through here)."""
    return shlex.quote(str(word))


def path_word(path: str) -> str:
    """A path as one shell word; a leading ``~/`` is left to the machine's shell ("$HOME"/...),
    so an interpreter under the home folder runs before anything has been asked."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + q(path[2:])
    return q(path)


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


class LineFeed:
    """Bytes in, complete lines out to a callback (for what is shown as it happens). A line is
    held up to MAX_LINE bytes; what a longer one has beyond that is dropped."""

    def __init__(self, on_line: Callable[[str], None], max_line: int = MAX_LINE) -> None:
        self.on_line, self.pending, self.max_line = on_line, bytearray(), max_line

    def feed(self, chunk: bytes) -> None:
        if b"\n" not in chunk:  # only the new bytes are searched: a long line costs what it is long
            self._hold(chunk)
            return
        first, *middle, rest = chunk.split(b"\n")
        self._hold(first)
        for line in (bytes(self.pending), *middle):
            self.on_line(line[: self.max_line].decode(errors="replace"))
        self.pending = bytearray()
        self._hold(rest)

    def _hold(self, part: bytes) -> None:
        room = self.max_line - len(self.pending)
        if room > 0:
            self.pending += part[:room]

    def flush(self) -> None:
        if self.pending:
            self.on_line(self.pending.decode(errors="replace"))
            self.pending = bytearray()


class Streams:
    """Where one command's output goes: stdout to a sink as it arrives (or kept, up to
    MAX_KEPT), the last MAX_STDERR bytes of stderr kept (and given to ``err_sink`` as they arrive)."""

    def __init__(self, sink: Sink | None, err_sink: Sink | None = None) -> None:
        self.sink, self.err_sink = sink, err_sink
        self.kept, self.errors = bytearray(), bytearray()

    def out(self, chunk: bytes) -> None:
        if self.sink is not None:
            self.sink(chunk)
        elif len(self.kept) < MAX_KEPT:
            self.kept += chunk[: MAX_KEPT - len(self.kept)]

    def err(self, chunk: bytes) -> None:
        if self.err_sink is not None:
            self.err_sink(chunk)
        self.errors += chunk
        if len(self.errors) > 2 * MAX_STDERR:
            del self.errors[:-MAX_STDERR]

    def result(self, code: int) -> Result:
        return Result(code, self.kept.decode(errors="replace"), self.errors[-MAX_STDERR:].decode(errors="replace"))


class Background(ABC):
    """A command left running on the machine (e.g. holding a lock while orch works)."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """EOF on its stdin, then let go of it."""


class Session(Background):
    """A command left running that orch talks with: its stdin written, its stdout read as it
    comes, the last MAX_STDERR bytes of its stderr kept (what error messages quote)."""

    def __init__(self) -> None:
        self.streams = Streams(None)  # only its stderr is kept there

    @abstractmethod
    def read(self, timeout: float) -> bytes | None:
        """Its stdout's next bytes: b"" once it ended, None when nothing came within ``timeout`` s."""

    @property
    def stderr(self) -> str:
        return self.streams.result(0).stderr


class Remote(ABC):
    """The training machine's transport."""

    host: str = ""

    @abstractmethod
    def _exec(self, command: str, write: Writer | None, timeout: float | None, streams: Streams) -> int:
        """Run ``command``, its stdin from ``write``, its output into ``streams``; its exit code."""

    def run(self, command: str, *, check: bool = True, timeout: float | None = None,
            write: Writer | None = None, what: str | None = None,
            on_line: Callable[[str], None] | None = None, on_data: Sink | None = None) -> Result:
        """Run a shell command; ``write`` streams its stdin; ``on_line`` gets each line of its
        stdout as it arrives, or ``on_data`` each chunk (then stdout is not kept in the Result).
        Non-zero exit -> RemoteError (unless not ``check``)."""
        feed = LineFeed(on_line) if on_line is not None else None
        streams = Streams(feed.feed if feed is not None else on_data)
        code = self._exec(command, write, timeout, streams)
        if feed is not None:
            feed.flush()
        result = streams.result(code)
        if check and result.code != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            tail = detail[-1] if detail else f"exit code {result.code}"
            raise RemoteError(f"{what or 'remote command'} failed on {self.host}: {tail}")
        return result

    def stream(self, command: str, frame: str, sink: Sink, *, write: Writer | None = None,
               what: str = "reading from the machine") -> None:
        """Run ``command``, which prints the frame line ``frame`` before its output; everything
        after the frame goes to ``sink`` as it arrives (what the shell printed before is dropped).
        RemoteError if the command fails or never printed its frame."""
        from orchestrator.transfer import Unframed

        unframed = Unframed(frame, sink)
        result = self.run(command, write=write, on_data=unframed.feed, check=False)
        _check_stream(result.code, result.stderr, unframed.found, f"{what} failed on {self.host}")

    def fetch(self, path: str, local: Path, progress: Progress | None = None, size: int | None = None) -> str:
        """Copy a remote file (an absolute path) to ``local`` (a temp name: renaming is the
        caller's), at most ``size`` bytes (what the run listed: a file swapped for a link to an
        endless device fills nothing); returns the sha256 of the bytes received, computed on the way."""
        from orchestrator.transfer import HashingWriter, framed, new_frame

        frame = new_frame()
        limit = size if size is not None else 1 << 62
        with open(local, "wb") as out:
            writer = HashingWriter(out, progress)

            def keep(data: bytes) -> None:
                if writer.done + len(data) > limit + (1 << 20):  # a shell's goodbye after the file, at most
                    raise RemoteError(f"{path} is bigger than the {size} bytes the run listed")
                writer(data[: max(0, limit - writer.done)])

            self.stream(framed(frame, f"cat -- {q(path)}"), frame, keep, what=f"reading {path}")
        return writer.hexdigest()

    @property
    def bulk_sessions(self) -> bool:
        """Whether :meth:`bulk_session` works here (OpenSSH is at hand)."""
        return False

    def bulk_session(self, command: str, first: bytes = b"", what: str = "a command") -> Any:
        """``command`` for bulk data, its stdin and stdout held open as pipes (orchestrator/ssh.py:
        BulkSession), a context manager; only where :attr:`bulk_sessions`."""
        raise NotImplementedError

    @abstractmethod
    def start(self, command: str) -> Background:
        """Start a command left running, its stdin open until the returned handle is closed."""

    @abstractmethod
    def session(self, command: str) -> Session:
        """Start a command left running that orch talks with (:class:`Session`) until it is closed."""

    @abstractmethod
    def interact(self, command: str, stdin: Reader | None, streams: Streams) -> int:
        """Run ``command`` with its output going to ``streams`` as it arrives while its stdin is
        fed, meanwhile, with what ``stdin()`` gives until it gives b"" (None: EOF at once); its
        exit code. `orch exec`, and a verb that lives as long as the command that runs it."""

    def close(self) -> None:  # noqa: B027 (nothing to release for the local target)
        """Release the connection."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shell_status(returncode: int) -> int:
    """A local child's exit code as a shell says it: killed by signal N is 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def feed(read: Reader, write: Callable[[bytes], None], close: Callable[[], None]) -> None:
    """Copy what ``read()`` gives to ``write`` until it gives b"", then ``close`` (a command's
    stdin, in a thread of its own); a command that went away ends it too."""
    try:
        for chunk in iter(read, b""):
            write(chunk)
    except Exception:  # the command has gone (its stdin closed), or orch's own stdin failed: EOF either way
        pass
    finally:
        with contextlib.suppress(Exception):
            close()


def _check_stream(code: int, stderr: str, found: bool, what: str) -> None:
    if code != 0 or not found:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        default = f"exit code {code}" if code != 0 else "its output never began (no frame line)"
        raise RemoteError(f"{what}: {lines[-1] if lines else default}")
