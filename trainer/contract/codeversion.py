"""The code version and the shipped file sets, derived from the package (never listed by hand).

- :func:`code_files`: the whole ``trainer`` package (sources and requirements.txt), what a
  deploy uploads; :func:`code_version` is ONE hash of it. orch computes it over the files it
  sends and prints it; the trainer computes it over its own files on the machine and records it
  in run.json: the same files, the same hash.
- :func:`bundle_files`: what orch sends with a question to the machine instead of uploading
  code: ``trainer/__init__.py`` and every module of ``trainer.contract`` and ``trainer.machine``
  (the machine side's import rule keeps it to those; tests/unit/test_layers.py runs every verb
  from exactly this bundle under ``python3 -I -S``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # trainer/
EXTRA_FILES = ("requirements.txt",)  # besides the sources
BUNDLED_PACKAGES = ("contract", "machine")  # with trainer/__init__.py: what runs on the machine's bare python3
BOOTSTRAP = "machine/bootstrap.py"  # the loader of a bundle sent on stdin (``python3 -c``)


def _sources(folder: Path, package: Path) -> dict[str, bytes]:
    return {
        f"trainer/{p.relative_to(package).as_posix()}": p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (p.suffix == ".py" or p.name in EXTRA_FILES) and "__pycache__" not in p.parts
    }


def code_files(package: Path = PACKAGE) -> dict[str, bytes]:
    """``{"trainer/<path>": content}``: every .py source (no caches) and the requirements."""
    return _sources(package, package)


def bundle_files(package: Path = PACKAGE) -> dict[str, bytes]:
    """``{"trainer/<path>": content}``: the machine side and the contract it imports."""
    files = {"trainer/__init__.py": (package / "__init__.py").read_bytes()}
    for name in BUNDLED_PACKAGES:
        files |= {k: v for k, v in _sources(package / name, package).items() if k.endswith(".py")}
    return files


def bootstrap_source(package: Path = PACKAGE) -> str:
    """The source of the bundle loader, sent as ``python3 -c`` (it is a module of its own, linted and tested)."""
    return (package / BOOTSTRAP).read_text()


def code_version(files: dict[str, bytes] | None = None) -> str:
    """12 hex digits of the sha256 over the sorted names and contents."""
    files = code_files() if files is None else files
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return h.hexdigest()[:12]
