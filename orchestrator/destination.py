"""The local side of a download: DEST itself, the temp names files are fetched into, the
folders a download creates (gone again if it fails), and the free space it needs."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from orchestrator.errors import ConfigError, DiskFull
from trainer.contract.files import DISK_FULL_ERRNOS as FULL

# A download's temp file beside its destination: .<name>.part-<pid of orch>
PART = re.compile(r"^\..+\.part-(\d+)$")


def part_path(local: Path) -> Path:
    """The temp name ``local`` is fetched into before it is checked and renamed."""
    return local.with_name(f".{local.name}.part-{os.getpid()}")


def is_regular_file(path: Path) -> bool:
    """A regular file itself (a link to one is replaced, never written through)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def check_dest(dest: Path) -> None:
    """DEST, or its nearest existing parent, must be a folder."""
    existing = dest
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--dest {dest}: {existing} is not a folder")


def disk_full(dest: Path) -> DiskFull:
    return DiskFull(f"no space left on device on {dest}: free space and run the download again")


def free_bytes(path: Path) -> int:
    """Free space for this user on the file system of ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_room(dest: Path, need: int) -> None:
    """Before writing: refuse a download that cannot fit (quotas are caught while writing)."""
    if need > free_bytes(dest):
        raise disk_full(dest)


def short_for_lack_of_room(tmp: Path, size: int) -> bool:
    """Whether ``tmp`` stopped short of ``size`` bytes because the disk is full: asking the file
    system for the missing bytes tells (it also answers for quotas)."""
    try:
        have = tmp.stat().st_size
    except OSError:
        return False
    if have >= size:
        return False
    if not hasattr(os, "posix_fallocate"):
        return free_bytes(tmp) < size - have
    fd = os.open(tmp, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, have, size - have)
    except OSError as exc:
        return exc.errno in FULL
    finally:
        os.close(fd)
    return False


def remove_stale_parts(target: Path) -> None:
    """Temp files of downloads whose orch is gone (killed outright) are removed."""
    if not target.is_dir():
        return
    for dirpath, _dirnames, filenames in os.walk(target):
        for name in filenames:
            match = PART.match(name)
            if match and not _alive(int(match[1])):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # our own pid: left by an earlier process that had it
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NewFolders:
    """The folders a download creates, removed again (when empty) if it fails: a failed
    download leaves no empty DEST/<run_id>/ behind."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def make(self, folder: Path) -> None:
        missing = []
        while not folder.is_dir() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        for f in reversed(missing):
            f.mkdir()
            self.made.append(f)

    @contextlib.contextmanager
    def kept_on_success(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            for f in reversed(self.made):
                with contextlib.suppress(OSError):
                    f.rmdir()
            raise


