"""Feature files -> one compact, validated in-memory (or memory-mapped) dataset.

Two passes keep memory at one copy of the data: a cheap header pass decides the majority
feature shape and every sample's offset, then each file is decoded once, straight into its
slice of a single float16 array. With a cache directory that array is a ``.npy`` memmap
inside the cache, so the next run over the same files decodes nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trainer.contract.labels import DEFAULT_CLASSES, label_from_path
from trainer.ml.errors import DataError

# Bump when what the loader stores changes, so old caches are not trusted.
LOADER_VERSION = 1
ARRAY_KEYS: tuple[str, ...] = ("emb", "embedding", "features", "wav2vec")
FEATURE_EXTENSIONS = (".npz", ".npy")
STORE_DTYPE = np.float16  # wav2vec features are O(1): float16 halves memory at no real cost
CACHE_ENV = "ORCH_TRAINER_CACHE"

ProgressFn = Callable[[int, int], None]


class SkipReason(str, Enum):
    """Why a feature file was left out; the value is what reports and JSON show."""

    UNREADABLE = "unreadable"
    NO_ARRAY = "no_array"
    EMPTY = "empty"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    WRONG_DIM = "wrong_dim"
    UNRECOGNIZED_NAME = "unrecognized_name"
    LABEL_NOT_IN_CLASSES = "label_not_in_classes"
    # What the folder walk finds besides regular files (never opened):
    SYMLINK_LOOP = "symlink_loop"
    DANGLING_LINK = "dangling_link"
    SPECIAL_FILE = "special_file"
    LINKED_FOLDER = "linked_folder"
    UNREADABLE_FOLDER = "unreadable_folder"

    @property
    def description(self) -> str:
        return _SKIP_DESCRIPTIONS[self]


_SKIP_DESCRIPTIONS = {
    SkipReason.UNREADABLE: "cannot be read (corrupt, truncated or not a numpy file)",
    SkipReason.NO_ARRAY: "no numeric array inside",
    SkipReason.EMPTY: "the array is empty",
    SkipReason.BAD_SHAPE: "the array is not (D,), (T, D) or (L, T, D)",
    SkipReason.NON_FINITE: "NaN or Inf values (or values beyond float16 range)",
    SkipReason.WRONG_DIM: "feature shape differs from the majority of files",
    SkipReason.UNRECOGNIZED_NAME: "name matches no RAVDESS/CREMA-D pattern and no label folder",
    SkipReason.LABEL_NOT_IN_CLASSES: "label is not in the class list",
    SkipReason.SYMLINK_LOOP: "a symbolic link that loops back on itself",
    SkipReason.DANGLING_LINK: "a symbolic link to nothing (its target is gone)",
    SkipReason.SPECIAL_FILE: "a named pipe, device or socket, not a regular file (never opened)",
    SkipReason.LINKED_FOLDER: "a symbolic link to a folder: not followed (link the files, or give the folder itself)",
    SkipReason.UNREADABLE_FOLDER: "a folder that cannot be listed (permissions): its files are left out",
}


@dataclass(frozen=True)
class Sample:
    """One usable utterance: its frames are ``frames[offset : offset + length]``."""

    rel: str
    label: str
    corpus: str
    speaker: str | None
    offset: int
    length: int


@dataclass(frozen=True)
class Skipped:
    rel: str
    reason: SkipReason
    detail: str = ""


@dataclass
class ScanInfo:
    """What the directory walk saw, before any array was read (for check-data)."""

    files_by_kind: dict[str, int] = field(default_factory=dict)
    links: int = 0  # feature files reached through a symbolic link (followed, counted above too)
    patterns: dict[str, int] = field(default_factory=dict)
    array_keys: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)


@dataclass
class Dataset:
    """All usable samples of a data directory, their frames stored once, contiguously."""

    root: Path
    classes: tuple[str, ...]
    feature_shape: tuple[int, ...]
    samples: list[Sample]
    skipped: list[Skipped]
    frames: np.ndarray  # (total_frames, *feature_shape), float16
    scan: ScanInfo
    cache: str = "off"  # "off" | "miss" (built now) | "hit" (memory-mapped from the cache)

    def __len__(self) -> int:
        return len(self.samples)

    def sequence(self, i: int) -> np.ndarray:
        s = self.samples[i]
        return self.frames[s.offset : s.offset + s.length]

    def label_ids(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        return np.array([s.length for s in self.samples], dtype=np.int64)

    def index_of(self) -> dict[str, int]:
        return {s.rel: i for i, s in enumerate(self.samples)}


# --------------------------------------------------------------------------- discovery


def is_stats_file(name: str) -> bool:
    """Normalization statistics (wav2vec_mean.npy, *_std.npy) are never samples."""
    lower = name.lower()
    return lower.endswith("_mean.npy") or lower.endswith("_std.npy")


@dataclass(frozen=True)
class _Candidate:
    rel: str
    size: int
    mtime_ns: int


def feature_files(root: Path) -> list[Path]:
    """The feature files below ``root``, exactly as the loader sees them."""
    return [root / c.rel for c in _walk(root).candidates]


@dataclass
class _Walked:
    candidates: list[_Candidate]
    skipped: list[Skipped]  # what is not a regular file (or a folder that cannot be listed)
    scan: ScanInfo


_SPECIAL_KINDS = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                  (stat.S_ISBLK, "block device"))


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # removed meanwhile
        return ""


def _special_kind(mode: int) -> str:
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "not a regular file")


def _walk(root: Path) -> _Walked:
    """List feature files below root (sorted, hidden folders skipped), count the rest, and
    say why whatever is not a regular file is left out. Only regular files are samples: a
    link to one is followed; links to folders are not (no loops, no file counted twice)."""
    walked = _Walked([], [], ScanInfo())
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
        for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            dirnames.remove(name)
            walked.skipped.append(Skipped(_rel(root, dirpath, name), SkipReason.LINKED_FOLDER))
        for name in sorted(filenames):
            _classify(root, dirpath, name, walked, kinds)
    walked.scan.files_by_kind = dict(kinds)
    return walked


def _rel(root: Path, dirpath: str, name: str) -> str:
    return Path(dirpath, name).relative_to(root).as_posix()


def _classify(root: Path, dirpath: str, name: str, walked: _Walked, kinds: Counter[str]) -> None:
    """One directory entry: a candidate, a counted non-sample, or a skip with its reason."""
    path = os.path.join(dirpath, name)
    rel = _rel(root, dirpath, name)
    try:
        st = os.stat(path)  # follows a link: a link to a regular file is that file
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            walked.skipped.append(Skipped(rel, SkipReason.SYMLINK_LOOP))
        elif exc.errno == errno.ENOENT and os.path.islink(path):
            walked.skipped.append(Skipped(rel, SkipReason.DANGLING_LINK, _link_target(path)))
        else:
            walked.skipped.append(Skipped(rel, SkipReason.UNREADABLE, exc.strerror or ""))
        return
    if not stat.S_ISREG(st.st_mode):
        walked.skipped.append(Skipped(rel, SkipReason.SPECIAL_FILE, _special_kind(st.st_mode)))
        return
    ext = os.path.splitext(name)[1].lower()
    if ext not in FEATURE_EXTENSIONS:
        kinds["other"] += 1
    elif is_stats_file(name):
        kinds["stats"] += 1
    else:
        kinds[ext[1:]] += 1
        walked.scan.links += os.path.islink(path)
        walked.candidates.append(_Candidate(rel, st.st_size, st.st_mtime_ns))


# --------------------------------------------------------------------------- arrays


class _NoArray(Exception):
    pass


def _choose_key(names: list[str]) -> str | None:
    for key in ARRAY_KEYS:
        if key in names:
            return key
    return names[0] if names else None


class NotRegularFile(OSError):
    """A path that is a named pipe, a device or a socket: it is never read."""


def open_regular(path: Path | str) -> BinaryIO:
    """Open a file for reading only if it is a regular file. O_NONBLOCK: opening a named pipe
    never waits for a writer (a file replaced by a pipe after the walk cannot hang a load)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({_special_kind(mode)})", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_array(path: Path) -> tuple[str, np.ndarray]:
    """Decode the array a feature file contributes, with the key it came from ("emb", ...,
    "first:<name>" when no known key exists, "npy" for .npy files). Never unpickles, never
    opens anything but a regular file."""
    with open_regular(path) as fh:
        if path.suffix.lower() == ".npy":
            return "npy", np.load(fh, allow_pickle=False)
        return _load_npz(fh)


def _load_npz(fh: BinaryIO) -> tuple[str, np.ndarray]:
    with zipfile.ZipFile(fh) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        key = _choose_key(names)
        if key is None:
            raise _NoArray("the .npz archive holds no array")
        with zf.open(key + ".npy") as fh:
            array = np.lib.format.read_array(fh, allow_pickle=False)
    return (key if key in ARRAY_KEYS else f"first:{key}"), array


def as_frames(arr: np.ndarray) -> np.ndarray:
    """(D,) -> (1, D); (T, D) stays; (L, T, D) -> (T, L, D) so frames come first."""
    if arr.ndim == 1:
        return arr[None, :]
    if arr.ndim == 3:
        return np.moveaxis(arr, 1, 0)
    return arr


def describe_shape(shape: tuple[int, ...]) -> str:
    """A shape as users think of it: (768,) / (T, 768) / (L=13, T, 768)."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    if len(shape) == 2:
        return f"(T, {shape[1]})"
    if len(shape) == 3:
        return f"(L={shape[0]}, T, {shape[2]})"
    return str(shape)


@dataclass(frozen=True)
class _Loaded:
    """One file after decoding: its frames (float16, frames first) or why it was skipped."""

    key: str | None
    shape: str | None
    frames: np.ndarray | None
    skip: SkipReason | None = None
    detail: str = ""


def _load_one(path: Path) -> _Loaded:
    """Decode, check and convert one file; every problem becomes a skip, never an error."""
    try:
        key, arr = load_array(path)
    except _NoArray as exc:
        return _Loaded(None, None, None, SkipReason.NO_ARRAY, str(exc))
    except NotRegularFile as exc:
        return _Loaded(None, None, None, SkipReason.SPECIAL_FILE, exc.strerror or "")
    except Exception as exc:  # any decoding problem means the file is unusable
        return _Loaded(None, None, None, SkipReason.UNREADABLE, _short(exc))
    shape = describe_shape(arr.shape)
    if arr.dtype.kind not in "fiu":
        return _Loaded(key, shape, None, SkipReason.NO_ARRAY, f"array dtype {arr.dtype} is not numeric")
    if arr.ndim == 0 or arr.ndim > 3:
        return _Loaded(key, shape, None, SkipReason.BAD_SHAPE, f"shape {arr.shape}")
    if arr.size == 0:
        return _Loaded(key, shape, None, SkipReason.EMPTY, f"shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        stored = as_frames(arr).astype(STORE_DTYPE)
    # Checking the stored float16 values catches NaN/Inf and float16 overflow at once.
    if not np.isfinite(stored).all():
        return _Loaded(key, shape, None, SkipReason.NON_FINITE)
    return _Loaded(key, shape, stored)


def _load_chunk(paths: list[str]) -> list[_Loaded]:
    return [_load_one(Path(p)) for p in paths]


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:160]


# --------------------------------------------------------------------------- loading

# Below this many files, or with 2 cores or fewer, worker processes cost more than they save
# (measured with bench/bench_load.py); threads never help: numpy's decoding holds the GIL.
PARALLEL_MIN_FILES = 2000
CHUNK = 256


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "orch-trainer")


def default_workers(n_files: int) -> int:
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 or n_files < PARALLEL_MIN_FILES else min(cores, 16)


def _decode_all(paths: list[str], workers: int, progress: ProgressFn | None) -> Iterator[_Loaded]:
    """Decode files in chunks, in worker processes when ``workers > 1``, in order."""
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    done = 0
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # forkserver/spawn: never fork a process that may already hold TensorFlow's threads.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            for results in pool.map(_load_chunk, chunks):
                done += len(results)
                if progress is not None:
                    progress(done, len(paths))
                yield from results
        return
    for chunk in chunks:
        results = _load_chunk(chunk)
        done += len(results)
        if progress is not None:
            progress(done, len(paths))
        yield from results


def load_dataset(
    data_dir: str | Path,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    workers: int | None = None,
) -> Dataset:
    """Discover, label, validate and load every feature file below ``data_dir``.

    Bad files are skipped and recorded with a reason; only a missing directory raises.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    walked = _walk(root)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = _cache_entry(cache_root, root, classes, walked.candidates) if use_cache else None
    ds = _read_cache(entry, root, classes, walked.scan) if entry is not None else None
    if ds is None:
        ds = _build(root, classes, walked.candidates, walked.scan, entry, progress, workers)
    # What the walk left out is seen afresh every time (it is not part of the cache key).
    ds.skipped = sorted(ds.skipped + walked.skipped, key=lambda s: s.rel)
    return ds


def _build(
    root: Path,
    classes: tuple[str, ...],
    candidates: list[_Candidate],
    scan: ScanInfo,
    entry: Path | None,
    progress: ProgressFn | None,
    workers: int | None,
) -> Dataset:
    skipped: list[Skipped] = []
    patterns: Counter[str] = Counter()
    labelled: list[tuple[str, Any]] = []
    for cand in candidates:
        info = label_from_path(cand.rel)
        patterns[info.pattern] += 1
        if info.label is None:
            detail = f"emotion code {info.code!r} is unknown" if info.code else ""
            skipped.append(Skipped(cand.rel, SkipReason.UNRECOGNIZED_NAME, detail))
        elif info.label not in classes:
            skipped.append(Skipped(cand.rel, SkipReason.LABEL_NOT_IN_CLASSES, info.label))
        else:
            labelled.append((cand.rel, info))
    scan.patterns = dict(patterns)

    # One decode per file; the float16 pieces are the only copy until they move below.
    paths = [str(root / rel) for rel, _ in labelled]
    n_workers = workers if workers is not None else default_workers(len(paths))
    loaded = list(_decode_all(paths, n_workers, progress))
    scan.array_keys = dict(Counter(item.key for item in loaded if item.key is not None))
    scan.shapes = dict(Counter(item.shape for item in loaded if item.shape is not None))
    shapes = Counter(item.frames.shape[1:] for item in loaded if item.frames is not None)
    feature_shape: tuple[int, ...] = tuple(shapes.most_common(1)[0][0]) if shapes else ()

    keep: list[int] = []
    for i, ((rel, _info), item) in enumerate(zip(labelled, loaded, strict=True)):
        if item.frames is None:
            skipped.append(Skipped(rel, item.skip or SkipReason.UNREADABLE, item.detail))
        elif item.frames.shape[1:] != feature_shape:
            detail = f"per-frame shape {item.frames.shape[1:]} vs majority {feature_shape}"
            skipped.append(Skipped(rel, SkipReason.WRONG_DIM, detail))
        else:
            keep.append(i)

    # Move each piece into its slice of the single frame array, dropping it as we go, so
    # memory holds one copy of the data (the target's pages only exist once written).
    total = sum(len(loaded[i].frames) for i in keep)  # type: ignore[arg-type]
    tmp_entry = _new_tmp_entry(entry) if entry is not None and keep else None
    frames = _allocate(tmp_entry, (total, *feature_shape))
    samples: list[Sample] = []
    offset = 0
    for i in keep:
        piece = loaded[i].frames
        assert piece is not None
        rel, info = labelled[i]
        frames[offset : offset + len(piece)] = piece
        loaded[i] = _DROPPED
        samples.append(Sample(rel, info.label, info.corpus, info.speaker, offset, len(piece)))
        offset += len(piece)
    skipped.sort(key=lambda s: s.rel)
    ds = Dataset(root, classes, feature_shape, samples, skipped, frames, scan)
    if tmp_entry is not None and entry is not None:
        ds = _commit_cache(ds, tmp_entry, entry)
    return ds


_DROPPED = _Loaded(None, None, None)


# --------------------------------------------------------------------------- cache

_INDEX = "index.json"
_FRAMES = "frames.npy"


def _cache_entry(
    cache_root: Path, root: Path, classes: tuple[str, ...], candidates: list[_Candidate]
) -> Path:
    """The cache folder for exactly this file list (names, sizes, mtimes) and class list."""
    # File names are bytes: os.fsencode gives back exactly those of a name that is not UTF-8.
    root_key = hashlib.sha256(os.fsencode(root)).hexdigest()[:12]
    h = hashlib.sha256(json.dumps([LOADER_VERSION, str(root), list(classes)]).encode())
    for c in candidates:
        h.update(os.fsencode(c.rel) + f"\0{c.size}\0{c.mtime_ns}\n".encode())
    return cache_root / f"{root_key}-{h.hexdigest()[:20]}"


def _new_tmp_entry(entry: Path) -> Path:
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _allocate(tmp_entry: Path | None, shape: tuple[int, ...]) -> np.ndarray:
    if tmp_entry is None:
        return np.empty(shape, dtype=STORE_DTYPE)
    return np.lib.format.open_memmap(tmp_entry / _FRAMES, mode="w+", dtype=STORE_DTYPE, shape=shape)


def _commit_cache(ds: Dataset, tmp_entry: Path, entry: Path) -> Dataset:
    """Write the index, rename the temp folder into place, drop older caches of this root."""
    frames = ds.frames
    if isinstance(frames, np.memmap):
        frames.flush()
    index = {
        "loader_version": LOADER_VERSION,
        "root": str(ds.root),
        "classes": list(ds.classes),
        "feature_shape": list(ds.feature_shape),
        "samples": [asdict(s) for s in ds.samples],
        "skipped": [[s.rel, s.reason.value, s.detail] for s in ds.skipped],
        "patterns": ds.scan.patterns,
        "array_keys": ds.scan.array_keys,
        "shapes": ds.scan.shapes,
    }
    (tmp_entry / _INDEX).write_text(json.dumps(index))
    try:
        os.rename(tmp_entry, entry)
    except OSError:  # another process cached the same data first: theirs is as good
        shutil.rmtree(tmp_entry, ignore_errors=True)
        ds.cache = "miss"
        return ds
    prefix = entry.name.split("-", 1)[0] + "-"
    for old in entry.parent.iterdir():
        if old.name.startswith(prefix) and old != entry and ".tmp-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    ds.frames = np.load(entry / _FRAMES, mmap_mode="r")
    ds.cache = "miss"
    return ds


def _read_cache(
    entry: Path, root: Path, classes: tuple[str, ...], scan: ScanInfo
) -> Dataset | None:
    """The cached dataset, or None when there is none or it is unreadable."""
    try:
        index = json.loads((entry / _INDEX).read_text())
        if index.get("loader_version") != LOADER_VERSION:
            return None
        frames = np.load(entry / _FRAMES, mmap_mode="r")
        samples = [Sample(**s) for s in index["samples"]]
        skipped = [Skipped(rel, SkipReason(reason), detail) for rel, reason, detail in index["skipped"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    scan.patterns = index["patterns"]
    scan.array_keys = index["array_keys"]
    scan.shapes = index["shapes"]
    feature_shape = tuple(index["feature_shape"])
    return Dataset(root, classes, feature_shape, samples, skipped, frames, scan, cache="hit")


def require_samples(ds: Dataset) -> None:
    """Raise a one-line DataError when nothing in the directory is usable."""
    if ds.samples:
        return
    n = sum(ds.scan.files_by_kind.get(k, 0) for k in ("npz", "npy"))
    reasons = Counter(s.reason.value for s in ds.skipped).most_common(2)
    why = ", ".join(f"{count} {reason}" for reason, count in reasons)
    if n == 0:
        # A linked or unreadable folder, or links to nothing, may be where the files are.
        left_out = f" (left out: {why})" if why else ""
        raise DataError(
            f"no .npz/.npy feature files found under {ds.root}{left_out}; "
            "check the path (python -m trainer check-data DIR shows what is there)"
        )
    raise DataError(
        f"no usable feature files under {ds.root}: all {n} were skipped ({why}); "
        f"run python -m trainer check-data {ds.root} for details"
    )
