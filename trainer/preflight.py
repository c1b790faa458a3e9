"""What the machine can do, asked before any run folder is created (and by ``orch doctor``).
Run by orch with the interpreter that will train:

    python -m trainer.preflight ROOT DATA_DIR [--import-tensorflow]

prints ONE JSON object: the interpreter, the installed versions of TensorFlow/Keras/numpy,
the GPUs nvidia-smi lists (with driver and CUDA versions), the GPUs TensorFlow sees (imported
only when nvidia-smi lists GPUs, or with --import-tensorflow: importing takes seconds), the
data folder (does it exist, how many labelled feature files) and the free disk under ROOT.
Pure Python apart from that optional import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# What orch sends to run this without uploading code (orchestrator.machine.Machine.ask).
MODULES = ("trainer/__init__.py", "trainer/preflight.py", "trainer/labels.py", "trainer/errors.py",
           "trainer/exitcodes.py")
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


def nvidia() -> dict[str, Any]:
    """GPUs as nvidia-smi lists them, with the driver and CUDA versions its header shows."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return {"count": 0, "names": [], "driver": None, "cuda": None, "error": "no nvidia-smi"}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"count": 0, "names": [], "driver": None, "cuda": None, "error": str(exc)}
    if listed.returncode != 0:
        why = (listed.stderr or listed.stdout).strip()[:200] or f"exit {listed.returncode}"
        return {"count": 0, "names": [], "driver": None, "cuda": None, "error": why}
    names = [m.group(1) for m in re.finditer(r"^GPU \d+: (.+?)(?: \(UUID.*)?$", listed.stdout, re.M)]
    driver = re.search(r"Driver Version:\s*([\d.]+)", header.stdout)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header.stdout)
    return {"count": len(names), "names": names, "driver": driver.group(1) if driver else None,
            "cuda": cuda.group(1) if cuda else None, "error": None}


def tensorflow_gpus() -> dict[str, Any]:
    """How many GPUs TensorFlow sees (it is imported: seconds)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf

        return {"gpus": len(tf.config.list_physical_devices("GPU")), "built_with_cuda": tf.test.is_built_with_cuda(),
                "error": None}
    except Exception as exc:  # a broken install: say what import says
        return {"gpus": None, "built_with_cuda": None, "error": f"{type(exc).__name__}: {exc}"[:300]}


def data(folder: Path) -> dict[str, Any]:
    """Does the data folder exist, and how many files in it look like labelled features?"""
    from trainer.labels import label_from_path  # pure Python

    if not folder.is_dir():
        return {"dir": str(folder), "exists": False, "feature_files": 0, "labelled": 0}
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
    return {"dir": str(folder), "exists": True, "feature_files": features, "labelled": labelled}


def disk(root: Path) -> dict[str, Any]:
    """Free space on the file system the runs are written to."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the runs folder may not exist yet
    usage = shutil.disk_usage(probe)
    return {"path": str(probe), "free_bytes": usage.free, "total_bytes": usage.total}


def preflight(root: Path, data_dir: Path, import_tensorflow: bool) -> dict[str, Any]:
    gpus = nvidia()
    found = packages()
    report = {"python": {"executable": sys.executable, "version": ".".join(map(str, sys.version_info[:3]))},
              "packages": found, "nvidia": gpus, "tensorflow": None, "data": data(data_dir), "disk": disk(root)}
    if found["tensorflow"] is not None and (gpus["count"] or import_tensorflow):
        report["tensorflow"] = tensorflow_gpus()
    return report


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--import-tensorflow"):
        print("usage: python -m trainer.preflight ROOT DATA_DIR [--import-tensorflow]", file=sys.stderr)
        return 2
    print(json.dumps(preflight(Path(argv[0]), Path(argv[1]), len(argv) == 3)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
