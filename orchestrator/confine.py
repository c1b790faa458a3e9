"""What `orch download` may write: a run's MANIFEST.sha256 is input from the machine, so
every entry is checked before anything is written.

An entry must be a plain relative path (no ``/`` at the start, no empty, ``.`` or ``..``
part, letters, digits and ``. _ + -`` only), a regular file of the run on the machine (reached
without following a link), and must land inside ``DEST/<run_id>/`` once the local folders,
links included, are resolved. One bad entry makes the whole run corrupt: nothing is written.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass
from pathlib import Path

from orchestrator.destination import PART
from orchestrator.errors import ConfigError, RemoteError
from trainer.contract import layout
from trainer.contract.wire import RunFiles

# Far above what a run lists (about ten files): more is a crafted manifest.
MAX_ENTRIES = 1000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME_MAX = 255  # bytes in one path part (Linux, macOS)
_SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]+")


class CorruptRun(RemoteError):
    """The run's manifest cannot be trusted: nothing was downloaded."""


@dataclass(frozen=True)
class Entry:
    """One file to download: checked, with where it goes."""

    rel: str
    sha256: str
    size: int  # on the machine, when it was listed
    local: Path  # inside DEST/<run_id>/, links resolved


def checked_entries(run_id: str, files: RunFiles, target: Path) -> list[Entry]:
    """The run's manifest, every entry checked (raises :class:`CorruptRun` naming the first
    bad one) and placed inside ``target``."""
    if files.too_big:
        raise _corrupt(run_id, f"holds more files, or a bigger {layout.MANIFEST}, than a run ever does")
    if files.manifest is None:
        raise RemoteError(f"run {run_id} has no {layout.MANIFEST} yet (no finished epoch?); nothing to download")
    entries = _parse(run_id, files.manifest)
    for rel in entries:
        problem = path_problem(rel) or _remote_problem(rel, files)
        if problem is not None:
            raise _corrupt(run_id, f"lists {rel!r}, {problem}")
    _check_no_file_is_a_folder(run_id, entries)
    return [Entry(rel, digest, files.files[rel], local_path(target, rel, run_id)) for rel, digest in entries.items()]


def _parse(run_id: str, text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_ENTRIES:
        raise _corrupt(run_id, f"lists {len(lines)} files (a run lists about ten)")
    entries: dict[str, str] = {}
    for line in lines:
        try:
            ((rel, digest),) = layout.parse_manifest(line).items()
        except ValueError:
            raise _corrupt(run_id, f"has a malformed line {line[:80]!r}") from None
        if not _HEX64.match(digest):
            raise _corrupt(run_id, f"has a malformed checksum for {rel!r}")
        if entries.setdefault(rel, digest) != digest:
            raise _corrupt(run_id, f"lists {rel!r} twice with different checksums")
    return entries


def path_problem(rel: str) -> str | None:
    """Why ``rel`` is not a plain relative path inside a folder, or None. The trainer names
    its files with letters, digits and ``. _ + -`` only: anything else (a control character,
    terminal or rich markup, bytes that are not UTF-8, quotes) is refused, not escaped."""
    if not rel:
        return "an empty path"
    if rel.startswith("/"):
        return "an absolute path"
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "a path with an empty, '.' or '..' part"
    if not all(_SAFE_NAME.fullmatch(part) for part in parts):
        return "a path with a character other than letters, digits, '.', '_', '+' and '-'"
    if any(len(part) > _NAME_MAX - 20 for part in parts):  # room for the temp name's suffix
        return "a path with a name longer than 235 bytes"
    if PART.match(parts[-1]):
        return "a name orch uses for its temp files"
    return None


def _remote_problem(rel: str, files: RunFiles) -> str | None:
    if rel not in files.files:
        return "which is not a regular file of the run (a folder, a link, a path through a link, or missing)"
    return None


def _check_no_file_is_a_folder(run_id: str, entries: dict[str, str]) -> None:
    """``a`` and ``a/b`` cannot both be files."""
    for rel in entries:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in entries:
                raise _corrupt(run_id, f"lists both {'/'.join(parts[:i])!r} and {rel!r}")


def local_path(target: Path, rel: str, run_id: str) -> Path:
    """Where ``rel`` goes: inside ``target`` once existing folders and links are resolved."""
    try:
        base = target.resolve()
        dest = base / rel
        inside = dest.parent.resolve().is_relative_to(base)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise ConfigError(f"{target}: cannot resolve {rel!r} there ({exc})") from exc
    if not inside:
        raise _corrupt(run_id, f"lists {rel!r}, which would be written outside {target} (through a link "
                               f"at {dest.parent})")
    try:
        mode = dest.lstat().st_mode
    except FileNotFoundError:
        return dest
    except OSError as exc:
        raise ConfigError(f"{dest}: cannot check it ({exc.strerror})") from exc
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{dest} is a folder where the run has a file; move it away and download again")
    return dest


def _corrupt(run_id: str, problem: str) -> CorruptRun:
    return CorruptRun(f"run {run_id} looks corrupt: its {layout.MANIFEST} {problem}; nothing was downloaded")
