"""The machine's end of sync (orchestrator/sync.py): code versions and data files appear whole
or not at all. Verbs:

    code-state ROOT VERSION                          -> CodeState: is it unpacked, whole?
    code-unpack ROOT VERSION   (tar.gz on stdin)     -> CodeState: unpacked beside, then renamed
    data-list DEST                                   -> DataListing: the regular files there
    data-receive STAGING DEST [list]  (go byte + tar on stdin) -> [DataListing, as data-list,
                                                        first], Moved: unpacked into STAGING
                                                        (GNU tar; orch puts it in DEST's hidden
                                                        .orch-upload/), then renamed into DEST

One upload into a data folder at a time: both verbs hold its lock (DEST/.orch-upload/lock)
while they run; the other one is told so (DataListing.busy, Moved.busy).

Standard library only.
"""

from __future__ import annotations

import base64
import glob
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

_HELD: dict[Path, int] = {}  # the upload locks this process holds (until it ends)


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


def _one_upload(dest: Path) -> str | None:
    """Take ``dest``'s upload lock for the rest of this process; why not (another upload holds it)."""
    if dest in _HELD:
        return None
    (dest / layout.DATA_UPLOAD_DIR).mkdir(parents=True, exist_ok=True)
    fd = lock(dest / layout.DATA_UPLOAD_DIR / layout.DATA_UPLOAD_LOCK, wait=0)
    if fd is None:
        return f"another upload into {dest} is under way"
    _HELD[dest] = fd
    return None


def list_data(dest: Path) -> DataListing:
    """Make sure ``dest`` exists, clear what an interrupted upload left in its staging folders,
    and list its regular files (hidden folders skipped) as NUL-separated (name, size, mtime)."""
    if (busy := _one_upload(dest)) is not None:
        return DataListing(busy=busy)
    # (and an older orch's, a hidden sibling of the data folder: .<name>.orch-incoming-<ns>)
    stale = [*(dest / layout.DATA_UPLOAD_DIR).glob(layout.DATA_STAGING_PREFIX + "*"),
             *dest.parent.glob(f".{glob.escape(dest.name)}.orch-incoming-*")]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
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
    if (busy := _one_upload(dest)) is not None:
        while os.read(0, 1 << 16):  # the stream read to its end: the sender's writes never fail first
            pass
        return Moved(0, busy=busy)
    widen_pipe(0)
    try:
        staging.mkdir(parents=True)
        # Its stdin is ours: the stream after the go byte, read in records of 1 MiB (-b 2048):
        # a fifth less CPU than 10 KiB ones on a fast transport (bench/bench_sync.py). LC_ALL=C:
        # its complaints in words this code knows; their start kept, the rest read and dropped
        # (never a file: the disk may be full; never all of it in memory).
        tar = subprocess.Popen(["tar", "-x", "-b", "2048", "-f", "-", "-C", str(staging)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"})
        assert tar.stderr is not None
        said = tar.stderr.read(8192).decode(errors="replace")
        while tar.stderr.read(1 << 16):
            pass
        tar.stderr.close()
        tar.wait()
    except OSError as exc:  # no tar on the machine, no room for the staging folder
        shutil.rmtree(staging, ignore_errors=True)
        return Moved(0, f"{exc.filename or 'tar'}: {exc.strerror or exc}", is_disk_full(exc))
    if tar.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        lines = [line for line in said.splitlines() if line.strip() and "Exiting with failure" not in line]
        full = any(words in said for words in ("No space left on device", "Disk quota exceeded"))
        return Moved(0, lines[0][:300] if lines else f"tar exited with {tar.returncode}", full)
    return move_data(staging, dest)


def move_data(staging: Path, dest: Path) -> Moved:
    """Each file renamed into place (os.replace: atomic per file); nothing moved when a name is
    a folder on one side and a file on the other (no data replaced by what it cannot be)."""
    src, dst = os.fsencode(staging), os.fsencode(dest)
    if (clash := _clash(src, dst)) is not None:
        shutil.rmtree(src, ignore_errors=True)
        name = os.fsdecode(clash)
        return Moved(0, f"{name!r} is a folder in the upload but a file or a link on the machine, or the reverse "
                     f"(in {dest}): rename or remove one of them; nothing was moved")
    count = 0
    try:
        for d, _ds, fs in os.walk(src):
            target = os.path.join(dst, os.path.relpath(d, src))
            os.makedirs(target, exist_ok=True)
            for f in fs:
                os.replace(os.path.join(d, f), os.path.join(target, f))
                count += 1
    except OSError as exc:  # moved so far: in place, whole; the rest goes with the staging folder
        shutil.rmtree(src, ignore_errors=True)
        return Moved(count, f"moving into {dest}: {exc.strerror or exc} ({count} files moved)", is_disk_full(exc))
    shutil.rmtree(src)
    return Moved(count)


def _clash(src: bytes, dst: bytes) -> bytes | None:
    """The first name (relative) that is a folder in the upload ``src`` and anything but a real
    folder in ``dst`` (a file; a link, even to a folder: the upload would land outside the data
    folder), or a file in ``src`` and a folder in ``dst`` (a link there is replaced)."""
    for d, ds, fs in os.walk(src):
        rel = os.path.relpath(d, src)
        for name in ds:
            there = os.path.join(dst, rel, name)
            if os.path.lexists(there) and (os.path.islink(there) or not os.path.isdir(there)):
                return os.path.normpath(os.path.join(rel, name))
        for name in fs:
            there = os.path.join(dst, rel, name)
            if os.path.isdir(there) and not os.path.islink(there):
                return os.path.normpath(os.path.join(rel, name))
    return None


def run(verb: str, argv: list[str], out: Any) -> int:
    answers = {
        "code-state": lambda: CodeState(code_present(Path(argv[0]), argv[1])),
        "code-unpack": lambda: unpack_code(Path(argv[0]), argv[1]),
        "data-list": lambda: list_data(Path(argv[0])),
        "data-receive": lambda: receive_data(Path(argv[0]), Path(argv[1]), out, argv[2:] == [LISTING_FIRST]),
    }
    out.answer(answers[verb]())
    return 0
