"""Reading what is on the machine, where anything may be. Only regular files are read: a named
pipe, a device or a socket in a file's place is reported (``NotRegular``), never opened in a way
that could wait; and no file is read without a bound: JSON files up to a size, logs by their
last bytes, every line cut at a length (and marked). Standard library only."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

MAX_JSON = 1 << 20  # status.json, run.json, deploy.json, state files: a few KB each
MAX_LINE = 4096  # a log line shown to the user
CUT = " [... {} more bytes cut]"
_KINDS = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


class NotRegular(OSError):
    """A path that is there but is not a regular file: it is never read."""


def special_kind(mode: int) -> str:
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def open_regular(path: Path | str) -> BinaryIO:
    """Open a file for reading only if it is a regular file. O_NONBLOCK: opening a named pipe
    never waits for a writer (a file replaced by a pipe after it was looked at cannot hang)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(errno.EINVAL, f"not a regular file ({special_kind(mode)})", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def problem(path: Path) -> str | None:
    """Why a file that is there cannot be one of the run's files ("status.json is a named pipe"),
    or None (a regular file, or nothing at all)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"{path.name} is not a regular file ({special_kind(mode)})"


def read_bytes(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file (OSError/NotRegular otherwise)."""
    with open_regular(path) as fh:
        return fh.read(limit)


def read_json(path: Path, limit: int = MAX_JSON) -> dict[str, Any]:
    """A JSON object file; {} when it is missing, not a regular file, too big or not an object."""
    try:
        data = read_bytes(path, limit + 1)
        doc = json.loads(data) if len(data) <= limit else None
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def cut(line: str, max_line: int = MAX_LINE) -> str:
    """A line at most ``max_line`` characters long; a longer one says how much was cut."""
    if len(line) <= max_line:
        return line
    return line[:max_line] + CUT.format(len(line) - max_line)


def tail_lines(path: Path, lines: int, max_line: int = MAX_LINE) -> list[str]:
    """The last ``lines`` lines of a text file, each cut at ``max_line``, reading only its last
    ``lines * (max_line + 1)`` bytes (a gigabyte without a newline costs what one line does)."""
    if lines <= 0:
        return []
    budget = lines * (max_line + 1)
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - budget))
            data = fh.read(budget)
    except OSError:
        return []
    text = data.decode("utf-8", "replace")
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    if size > budget and len(parts) > 1:
        parts = parts[1:]  # the first one is the end of a line that began earlier
    return [cut(p.rstrip("\r"), max_line) for p in parts[-lines:]]


def iter_lines(path: Path, max_line: int = 1 << 16) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, its bytes) of every line of a regular file; a line over ``max_line``
    bytes comes as None (it is not read into memory)."""
    try:
        fh = open_regular(path)
    except OSError:
        return
    with fh:
        number, pending, overlong = 0, bytearray(), False
        for block in iter(lambda: fh.read(1 << 20), b""):
            *complete, rest = block.split(b"\n")
            for part in complete:
                number += 1
                line = None if overlong or len(pending) + len(part) > max_line else bytes(pending + part)
                pending, overlong = bytearray(), False
                yield number, line
            if overlong or len(pending) + len(rest) > max_line:
                pending, overlong = bytearray(), True
            else:
                pending += rest
        if pending or overlong:
            yield number + 1, None if overlong else bytes(pending)
