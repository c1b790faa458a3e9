"""What the machine can do, asked before any run folder is created (and by ``orch doctor``).
Verb ``preflight``, run by orch with the interpreter that will train, with its own packages:

    preflight ROOT DATA_DIR [--import-tensorflow]                              -> Preflight

answers: the interpreter, the installed versions of TensorFlow/Keras/numpy,
the GPUs nvidia-smi lists (with driver and CUDA versions), whether TensorFlow and Keras really
import and how many GPUs TensorFlow sees, the data folder (does it exist, how many labelled
feature files) and the free disk under ROOT.

Importing TensorFlow takes seconds, so its result is cached on the machine (~/.cache/orch/preflight),
keyed by the interpreter, its package folders (any install or removal changes them) and what
nvidia-smi says (a broken driver changes that); --import-tensorflow ignores the cache.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.labels import label_from_path
from trainer.contract.wire import MAX_GPUS, DataCheck, DiskCheck, NvidiaInfo, Preflight, PythonInfo, TensorflowCheck
from trainer.machine.proc import bounded_output

FEATURE_SUFFIXES = (".npz", ".npy")
COUNT_LIMIT = 100_000  # enough to say "there is data"; a big folder is not walked to its end


def packages() -> dict[str, str | None]:
    """Installed versions (None: missing), without importing anything."""
    found: dict[str, str | None] = {}
    for name in ("tensorflow", "keras", "numpy"):
        module = "tensorflow" if name == "tensorflow" else name
        if importlib.util.find_spec(module) is None:
            found[name] = None
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def nvidia() -> NvidiaInfo:
    """GPUs as nvidia-smi lists them, with the driver and CUDA versions its header shows."""
    try:
        code, listed = bounded_output(["nvidia-smi", "-L"], timeout=30)
        _, header = bounded_output(["nvidia-smi"], timeout=30)
    except FileNotFoundError:
        return NvidiaInfo(error="no nvidia-smi")
    except OSError as exc:
        return NvidiaInfo(error=str(exc))
    if code != 0:
        return NvidiaInfo(error=listed.strip()[:200] or ("nvidia-smi -L hung" if code is None else f"exit {code}"))
    names = [m.group(1)[:200] for m in re.finditer(r"^GPU \d+: (.+?)(?: \(UUID.*)?$", listed, re.M)][:MAX_GPUS]
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return NvidiaInfo(len(names), names, driver.group(1) if driver else None, cuda.group(1) if cuda else None)


def tensorflow_gpus() -> TensorflowCheck:
    """Import TensorFlow and Keras for real (seconds) and count the GPUs TensorFlow sees."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import keras  # noqa: F401 (its import is the check)
        import tensorflow as tf

        return TensorflowCheck(len(tf.config.list_physical_devices("GPU")), tf.test.is_built_with_cuda())
    except BaseException as exc:  # a broken install: say what import says
        return TensorflowCheck(error=f"{type(exc).__name__}: {exc}"[:300])


def _cache_key(found: dict[str, str | None], gpus: NvidiaInfo) -> str:
    """What the import result depends on: the interpreter, its package folders, nvidia-smi."""
    import hashlib

    folders = []
    for entry in sys.path:
        with contextlib.suppress(OSError):
            folders.append((entry, os.stat(entry).st_mtime_ns))
    what = [os.path.realpath(sys.executable), list(sys.version_info[:3]), folders, found,
            [gpus.count, gpus.driver, gpus.error]]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:20]


def tensorflow_check(found: dict[str, str | None], gpus: NvidiaInfo, fresh: bool) -> TensorflowCheck:
    """tensorflow_gpus(), from the cache when nothing it depends on changed."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / layout.PREFLIGHT_CACHE
    path = cache / f"{_cache_key(found, gpus)}.json"
    if not fresh:
        with contextlib.suppress(OSError, ValueError, TypeError):
            return TensorflowCheck(**json.loads(path.read_text()), cached=True)
    result = tensorflow_gpus()
    # A cache, nothing more (no run-folder guarantees needed): a read-only home is fine.
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({k: v for k, v in asdict(result).items() if k != "cached"}))
        os.replace(tmp, path)
    return result


def data(folder: Path) -> DataCheck:
    """Does the data folder exist, and how many files in it look like labelled features?"""
    if not folder.is_dir():
        return DataCheck(str(folder), False)
    features = labelled = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(FEATURE_SUFFIXES) and not name.lower().endswith(("_mean.npy", "_std.npy")):
                features += 1
                rel = os.path.relpath(os.path.join(dirpath, name), folder)
                labelled += label_from_path(rel).label is not None
        if features >= COUNT_LIMIT:
            break
    return DataCheck(str(folder), True, features, labelled)


def disk(root: Path) -> DiskCheck:
    """Free space on the file system the runs are written to."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the runs folder may not exist yet
    usage = shutil.disk_usage(probe)
    return DiskCheck(str(probe), usage.free, usage.total, writable(probe))


def writable(folder: Path) -> bool:
    """Whether this user can create a file in ``folder`` (tried, not guessed from the mode bits)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".orch-writable-"):
            return True
    except OSError:
        return False


def preflight(root: Path, data_dir: Path, import_tensorflow: bool) -> Preflight:
    gpus = nvidia()
    found = packages()
    tensorflow = None
    if found["tensorflow"] is not None and found["keras"] is not None:
        tensorflow = tensorflow_check(found, gpus, fresh=import_tensorflow)
    python = PythonInfo(sys.executable, ".".join(map(str, sys.version_info[:3])))
    return Preflight(python, found, gpus, tensorflow, data(data_dir), disk(root))


def run(verb: str, argv: list[str], out: Any) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--import-tensorflow"):
        raise SystemExit("usage: python3 -m trainer.machine FRAME preflight ROOT DATA_DIR [--import-tensorflow]")
    out.answer(preflight(Path(argv[0]), Path(argv[1]), len(argv) == 3))
    return 0
