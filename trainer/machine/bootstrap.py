"""Runs ``trainer.machine`` from a bundle sent on stdin: a read-only question uploads nothing.
orch runs this file's text as

    python3 -I -S -c "<this file>" FRAME VERB [ARGS...]

with stdin: the bundle's size (HEADER bytes, decimal), the bundle (a zip of trainer/__init__.py,
trainer/contract/ and trainer/machine/: trainer.contract.codeversion.bundle_files), then
whatever the verb itself reads. ``-I -S``: no PYTHON* variables, no user or site packages, not
the working folder on sys.path; and the bundle's finder comes first, so nothing on the machine's
disk stands in for a module of the bundle. Standard library only.
"""

from __future__ import annotations

import sys

# The working folder (the login's home) must not lend this loader a module of its own
# (a zipfile.py there), whatever flags the interpreter was started with.
sys.path[:] = [p for p in sys.path if p not in ("", ".")]

import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import zipfile  # noqa: E402

HEADER = 16
PACKAGE = "trainer"


def read_exactly(n: int) -> bytes:
    """``n`` bytes of fd 0, unbuffered: what follows the bundle stays for the verb."""
    chunks, left = [], n
    while left:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            raise SystemExit(f"bootstrap: the bundle ended after {n - left} of {n} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class BundleFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Imports ``trainer`` and its modules from the zip, and nothing else."""

    def __init__(self, bundle: zipfile.ZipFile) -> None:
        self.names = set(bundle.namelist())
        self.bundle = bundle

    def _path(self, fullname: str) -> str | None:
        base = fullname.replace(".", "/")
        return next((p for p in (base + "/__init__.py", base + ".py") if p in self.names), None)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        source = self._path(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=f"<bundle>/{source}",
                                               is_package=source.endswith("/__init__.py"))

    def is_package(self, fullname: str) -> bool:
        return (self._path(fullname) or "").endswith("/__init__.py")

    def get_source(self, fullname: str) -> str:
        source = self._path(fullname)
        if source is None:
            raise ImportError(f"{fullname} is not in the bundle", name=fullname)
        return self.bundle.read(source).decode()

    def get_code(self, fullname: str) -> object:
        return compile(self.get_source(fullname), f"<bundle>/{self._path(fullname)}", "exec")


def main() -> None:
    if sys.version_info < (3, 8):
        raise SystemExit(f"orch needs python3 >= 3.8 on the machine; {sys.executable} is "
                         f"{sys.version.split()[0]} (set remote.env.base_python or remote.python)")
    size = int(read_exactly(HEADER))
    sys.meta_path.insert(0, BundleFinder(zipfile.ZipFile(io.BytesIO(read_exactly(size)))))
    sys.argv = ["python3 -m trainer.machine", *sys.argv[1:]]
    runpy.run_module("trainer.machine", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
