"""Walking a data directory: the feature files it holds (regular files only; a link to one is
followed, links to folders are not), what else is there, and why what is left out is left out."""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trainer.machine.readers import special_kind
from trainer.ml.dataset import ScanInfo, Skipped, SkipReason
from trainer.ml.errors import DataError

FEATURE_EXTENSIONS = (".npz", ".npy")


def is_stats_file(name: str) -> bool:
    """Normalization statistics (wav2vec_mean.npy, *_std.npy) are never samples."""
    lower = name.lower()
    return lower.endswith("_mean.npy") or lower.endswith("_std.npy")


@dataclass(frozen=True)
class Candidate:
    rel: str
    size: int
    mtime_ns: int


def feature_files(root: Path) -> list[Path]:
    """The feature files below ``root``, exactly as the loader sees them."""
    return [root / c.rel for c in walk(root).candidates]


@dataclass
class Walked:
    candidates: list[Candidate]
    skipped: list[Skipped]  # what is not a regular file (or a folder that cannot be listed)
    scan: ScanInfo




def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # removed meanwhile
        return ""


def walk(root: Path) -> Walked:
    """List feature files below root (sorted, hidden folders skipped), count the rest, and
    say why whatever is not a regular file is left out. Only regular files are samples: a
    link to one is followed; links to folders are not (no loops, no file counted twice)."""
    walked = Walked([], [], ScanInfo())
    kinds: Counter[str] = Counter()

    def unreadable(exc: OSError) -> None:
        folder = Path(exc.filename or root)
        if folder == root:
            raise DataError(f"data directory {root} cannot be read ({exc.strerror})")
        walked.skipped.append(Skipped(folder.relative_to(root).as_posix(), SkipReason.UNREADABLE_FOLDER,
                                      exc.strerror or ""))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        # Hidden folders hold caches and tool state, never samples.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        prefix = _prefix(root, dirpath)
        for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            dirnames.remove(name)
            walked.skipped.append(Skipped(prefix + name, SkipReason.LINKED_FOLDER))
        for name in sorted(filenames):
            _classify(os.path.join(dirpath, name), prefix + name, name, walked, kinds)
    walked.scan.files_by_kind = dict(kinds)
    return walked


def _prefix(root: Path, dirpath: str) -> str:
    """What goes before a name in this folder to make it relative to root ("" or "a/b/")."""
    rel = Path(dirpath).relative_to(root).as_posix()
    return "" if rel == "." else rel + "/"


def _classify(path: str, rel: str, name: str, walked: Walked, kinds: Counter[str]) -> None:
    """One directory entry: a candidate, a counted non-sample, or a skip with its reason."""
    try:
        st = os.lstat(path)
        link = stat.S_ISLNK(st.st_mode)
        if link:
            st = os.stat(path)  # a link to a regular file is that file
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            walked.skipped.append(Skipped(rel, SkipReason.SYMLINK_LOOP))
        elif exc.errno == errno.ENOENT and os.path.islink(path):
            walked.skipped.append(Skipped(rel, SkipReason.DANGLING_LINK, _link_target(path)))
        else:
            walked.skipped.append(Skipped(rel, SkipReason.UNREADABLE, exc.strerror or ""))
        return
    if not stat.S_ISREG(st.st_mode):
        walked.skipped.append(Skipped(rel, SkipReason.SPECIAL_FILE, special_kind(st.st_mode)))
        return
    ext = os.path.splitext(name)[1].lower()
    if ext not in FEATURE_EXTENSIONS:
        kinds["other"] += 1
    elif is_stats_file(name):
        kinds["stats"] += 1
    else:
        kinds[ext[1:]] += 1
        walked.scan.links += link
        walked.candidates.append(Candidate(rel, st.st_size, st.st_mtime_ns))
