"""The machine's end of sync (orchestrator/sync.py): code versions and data files appear whole
or not at all. Verbs:

    code-state ROOT VERSION                          -> CodeState: is it unpacked, whole?
    code-unpack ROOT VERSION   (tar.gz on stdin)     -> CodeState: unpacked beside, then renamed
    data-list DEST                                   -> DataListing: the regular files there
    data-receive STAGING DEST [list]  (go byte + tar on stdin) -> [DataListing, as data-list,
                                                        first], Moved: unpacked into STAGING
                                                        (GNU tar), then renamed into DEST

Standard library only.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.blocks import widen_pipe
from trainer.contract.files import is_disk_full
from trainer.contract.verbs import DATA_GO, LISTING_FIRST
from trainer.contract.wire import CodeState, DataListing, Moved
from trainer.machine.locks import lock


def code_dir(root: Path, version: str) -> Path:
    return root / layout.CODE_DIR / version


def code_present(root: Path, version: str) -> bool:
    return (code_dir(root, version) / layout.CODE_COMPLETE).exists()


def unpack_code(root: Path, version: str) -> CodeState:
    """Unpack the tar.gz on stdin beside, then rename, under a lock: a half-sent bundle never
    becomes a code version, and two deploys at once never remove each other's."""
    folder = root / layout.CODE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd = lock(folder / layout.CODE_LOCK)
    try:
        final = code_dir(root, version)
        if code_present(root, version):
            sys.stdin.buffer.read()  # drain it: the sender must not see a broken pipe
            return CodeState(True)
        tmp = final.with_name(f"{final.name}{layout.TEMP_PREFIX}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|gz") as tar:
            data_only = getattr(tarfile, "data_filter", None)  # Python >= 3.12 (and backports): no links out
            tar.extractall(tmp, **({"filter": data_only} if data_only else {}))
        (tmp / layout.CODE_COMPLETE).touch()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return CodeState(True)
    finally:
        if fd is not None:
            os.close(fd)


def list_data(dest: Path) -> DataListing:
    """Clear what an interrupted upload left in its staging folders, make sure ``dest`` exists,
    and list its regular files (hidden folders skipped) as NUL-separated (name, size, mtime)."""
    parent, name = dest.parent, dest.name
    if parent.is_dir():
        for stale in parent.glob(layout.data_staging_prefix(name) + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.fsencode(dest)
    out = []
    for d, ds, fs in os.walk(root):
        ds[:] = [x for x in ds if not x.startswith(b".")]
        for f in fs:
            p = os.path.join(d, f)
            try:
                s = os.stat(p)
            except OSError:
                continue
            if stat.S_ISREG(s.st_mode):
                out.append(b"%s\0%d\0%d\0" % (os.path.relpath(p, root), s.st_size, int(s.st_mtime)))
    return DataListing(base64.b64encode(b"".join(out)).decode())


def receive_data(staging: Path, dest: Path, out: Any, listing_first: bool) -> Moved:
    """The upload on stdin: after the go byte, a tar stream that GNU tar unpacks into the new
    folder ``staging``, then moved into ``dest``; a failed or cut stream removes ``staging`` and
    answers why (tar's first complaint, and whether the disk is full). EOF instead of the go
    byte: orch had nothing to send. orch opens this before it knows what to send, so
    ``staging`` is made only once the go byte came (after ``data-list`` cleared what an
    interrupted upload left). ``listing_first``: this command answers ``data-list`` first (one
    interpreter's start and one connection for a whole upload over OpenSSH)."""
    if listing_first:
        out.answer(list_data(dest))
    if os.read(0, 1) != DATA_GO:
        return Moved(0)
    widen_pipe(0)
    try:
        staging.mkdir(parents=True)
        # Its stdin is ours: the stream after the go byte, read in records of 1 MiB (-b 2048):
        # a fifth less CPU than 10 KiB ones on a fast transport (bench/bench_sync.py). LC_ALL=C:
        # its complaints in words this code knows.
        tar = subprocess.run(["tar", "-x", "-b", "2048", "-f", "-", "-C", str(staging)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"})
    except OSError as exc:  # no tar on the machine, no room for the staging folder
        shutil.rmtree(staging, ignore_errors=True)
        return Moved(0, f"{exc.filename or 'tar'}: {exc.strerror or exc}", is_disk_full(exc))
    if tar.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        said = tar.stderr[:8192].decode(errors="replace")
        lines = [line for line in said.splitlines() if line.strip() and "Exiting with failure" not in line]
        full = any(words in said for words in ("No space left on device", "Disk quota exceeded"))
        return Moved(0, lines[0][:300] if lines else f"tar exited with {tar.returncode}", full)
    return move_data(staging, dest)


def move_data(staging: Path, dest: Path) -> Moved:
    """Into an empty data folder, the staging folder is renamed as a whole; otherwise each file
    is renamed into place (os.replace: atomic per file)."""
    src, dst = os.fsencode(staging), os.fsencode(dest)
    if not os.listdir(dst):
        count = sum(len(fs) for _d, _ds, fs in os.walk(src))
        os.rmdir(dst)
        os.rename(src, dst)
        return Moved(count)
    count = 0
    for d, _ds, fs in os.walk(src):
        target = os.path.join(dst, os.path.relpath(d, src))
        os.makedirs(target, exist_ok=True)
        for f in fs:
            os.replace(os.path.join(d, f), os.path.join(target, f))
            count += 1
    shutil.rmtree(src)
    return Moved(count)


def run(verb: str, argv: list[str], out: Any) -> int:
    answers = {
        "code-state": lambda: CodeState(code_present(Path(argv[0]), argv[1])),
        "code-unpack": lambda: unpack_code(Path(argv[0]), argv[1]),
        "data-list": lambda: list_data(Path(argv[0])),
        "data-receive": lambda: receive_data(Path(argv[0]), Path(argv[1]), out, argv[2:] == [LISTING_FIRST]),
    }
    out.answer(answers[verb]())
    return 0
