"""File facts both halves need, written once: a file's sha256 and "is this a full disk?"."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

BLOCK = 1 << 20
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def hash_stream(fh: BinaryIO, h: hashlib._Hash | None = None,
                on_block: Callable[[bytes], None] | None = None) -> hashlib._Hash:
    """Feed ``fh`` to the end into ``h`` (a new sha256 by default), block by block; ``on_block``
    sees each block too (to write it elsewhere, to count it)."""
    h = h or hashlib.sha256()
    while block := fh.read(BLOCK):
        h.update(block)
        if on_block is not None:
            on_block(block)
    return h


def sha256_file(path: Path | str, *, fsync: bool = False) -> str:
    """The sha256 of a file, read once; ``fsync``: make it durable on the way (a file written by
    someone else, such as Keras)."""
    with open(path, "rb") as fh:
        digest = hash_stream(fh).hexdigest()
        if fsync:
            os.fsync(fh.fileno())
    return digest


def disk_full_error(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is 'no space left' or 'quota exceeded'."""
    return disk_full_error(exc) is not None


@contextlib.contextmanager
def writing_alone(fd: int) -> Iterator[None]:
    """Hold an flock on an open file while writing it: train.log has two writers (the log filter
    appending lines, a restore from storage rewriting it whole) and no line may fall between
    a rewrite's read and its truncate."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
