"""Durable file operations: a reader (or a kill, or a power cut) never sees a half-written file,
and a rename is on disk before whatever follows it. Standard library only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from trainer.contract.files import DISK_FULL_ERRNOS, is_disk_full
from trainer.contract.layout import TEMP_PREFIX
from trainer.machine import faults

_serial = itertools.count()


def temp_path(path: Path, suffix: str = "") -> Path:
    """A new temp name beside ``path`` (same folder, so the rename is atomic) that the next
    start recognises and removes (layout.is_temp). Unique within this process; the one
    writer of a run directory holds its lock, so no other process competes for the name."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{next(_serial)}{suffix}")


def fsync_dir(path: Path) -> None:
    """Make the renames and new names in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, suffix: str = "", renamed_failpoint: str | None = None) -> Iterator[Path]:
    """Write a temp file beside ``path`` in the body, then rename it over ``path`` and fsync the
    folder: readers see the old file or the whole new one. On any failure the temp file goes and
    a disk-full error names ``path``. ``renamed_failpoint``: the failpoint between rename and folder fsync."""
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
        if renamed_failpoint:
            faults.point(renamed_failpoint)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        name_the_file(exc, path)
        raise


def atomic_write(path: Path, write: Callable[[BinaryIO], None], failpoint: str | None = None,
                 mode: int = 0o666) -> None:
    """``write(file)`` to a temp file, fsync it, then replace ``path`` (see :func:`replacing`);
    ``mode`` before the umask (0o600: a file only this user may read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if failpoint:
            faults.point(failpoint)


def atomic_write_bytes(path: Path, data: bytes, failpoint: str | None = None, mode: int = 0o666) -> None:
    atomic_write(path, lambda fh: fh.write(data), failpoint, mode)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: Path, obj: Any, failpoint: str | None = None, mode: int = 0o666) -> None:
    atomic_write_bytes(path, json_bytes(obj), failpoint, mode)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` (which must not exist) becomes ``src``'s content: a hard link (instant, no space)
    where the filesystem allows it, else an fsynced copy."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if is_disk_full(exc):
            raise
        shutil.copyfile(src, dst)
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())


def overwrite_in_place(path: Path, data: bytes) -> None:
    """Rewrite a small file without a temp file: the last resort on a full disk, where the
    blocks it frees are the ones it needs. Not atomic: only for files no manifest lists."""
    with open(path, "r+b" if path.exists() else "wb") as fh:
        fh.truncate(0)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def name_the_file(exc: BaseException, path: Path) -> None:
    """A write's OSError often names no file (``fh.write``): name the one being written, so a
    'no space left' message can say where."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS and not exc.filename:
        exc.filename = str(path)
