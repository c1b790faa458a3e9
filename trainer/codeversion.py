"""The code version: ONE hash of the trainer package's shipped files. orch computes it over
the bundle it sends and prints it; the trainer computes it over its own files on the machine
and records it in run.json: the same files, the same hash. (Pure Python.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).parent
EXTRA_FILES = ("requirements.txt",)  # besides the sources


def code_files(package: Path = PACKAGE) -> dict[str, bytes]:
    """``{"trainer/<path>": content}``: every .py source (no caches) and the requirements."""
    return {
        f"trainer/{p.relative_to(package).as_posix()}": p.read_bytes()
        for p in sorted(package.rglob("*"))
        if p.is_file() and (p.suffix == ".py" or p.name in EXTRA_FILES) and "__pycache__" not in p.parts
    }


def code_version(files: dict[str, bytes] | None = None) -> str:
    """12 hex digits of the sha256 over the sorted names and contents."""
    files = code_files() if files is None else files
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()[:12]
