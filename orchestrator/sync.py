"""Ship the trainer code (content-addressed, once per version) and the data (only what
changed, never a half-written file in place) to the machine. The machine's end is
trainer/machine/receive.py."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from orchestrator import children
from orchestrator.errors import BusyError, ConfigError, DiskFull, RemoteError
from orchestrator.machine import Machine
from orchestrator.ssh import BulkSession
from trainer.contract import layout, verbs
from trainer.contract.codeversion import code_files, code_version
from trainer.contract.wire import DataListing, Moved

Log = Callable[[str], None]


@dataclass(frozen=True)
class CodeBundle:
    version: str
    files: dict[str, bytes]  # path inside the bundle -> content

    def tar_gz(self) -> bytes:
        """A reproducible tar.gz (sorted, zero mtimes) of the bundle."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
            for name in sorted(self.files):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(self.files[name]), 0o644, 0
                tar.addfile(info, io.BytesIO(self.files[name]))
        return buf.getvalue()


def code_bundle() -> CodeBundle:
    """The trainer package (sources + requirements.txt), named by its code version; the
    requirements also at the top, where remote.setup runs (`pip install -r requirements.txt`)."""
    files = code_files()
    return CodeBundle(code_version(files), files | {"requirements.txt": files["trainer/requirements.txt"]})


@dataclass(frozen=True)
class CodeSync:
    version: str
    path: str  # absolute code folder on the machine (its parent of trainer/)
    transferred: bool


def sync_code(m: Machine) -> CodeSync:
    """Make ROOT/code/<version>/ exist on the machine; transfer only if it does not yet. It is
    unpacked beside and renamed, under a lock: a half-sent bundle never becomes a code version,
    and two deploys at once never remove each other's."""
    bundle = code_bundle()
    code_dir = f"{m.root}/{layout.CODE_DIR}/{bundle.version}"
    present = m.answer(verbs.CODE_STATE, m.root, bundle.version).present
    if not present:
        payload = bundle.tar_gz()
        m.log(f"sending code version {bundle.version} ({len(payload) / 1024:.0f} KiB)")
        m.answer(verbs.CODE_UNPACK, m.root, bundle.version, stdin=lambda fh: fh.write(payload))
    return CodeSync(bundle.version, code_dir, not present)


@dataclass(frozen=True)
class DataSync:
    files: int  # files sent
    bytes: int
    seconds: float
    method: str  # "ssh" (tar over the OpenSSH client) | "channel" (tar over our connection)
    skipped: int = 0  # entries left out: links to nothing, pipes, devices, unreadable files or folders


def sync_data(m: Machine, *, use_ssh_client: bool = True) -> DataSync:
    """Upload data.local_dir to data.remote_dir: new or changed files only (size and mtime).

    One listing, then ONE tar stream of what changed into a hidden staging folder beside the
    data, moved into place by the same command on the machine (trainer/machine/receive.py):
    an interruption leaves no partial file under a final name, and running it again finishes
    the job. Over OpenSSH that command's connection is opened first, and the machine lists its
    files while this computer lists its own, so the tar stream starts as soon as both are known.
    File names are bytes end to end (listings are NUL-separated): any valid POSIX name travels.
    Only regular files are sent, a link as the file it leads to; what cannot be sent is counted
    and logged. A file that changed while tar read it (GNU tar's exit 1: it may have arrived
    torn) is sent again by a second pass, before anything trains on it.
    """
    done, torn = _sync_pass(m, use_ssh_client)
    if not torn:
        return done
    m.log(f"data: {torn} (a file changed while it was sent): sending what changed once more")
    again, torn = _sync_pass(m, use_ssh_client)
    if torn:
        raise RemoteError(f"data: files in {m.cfg.data.local_dir} keep changing while they are sent ({torn}): stop "
                          "what writes into it, then sync again")
    return replace(again, files=done.files + again.files, bytes=done.bytes + again.bytes,
                   seconds=done.seconds + again.seconds)


def _sync_pass(m: Machine, use_ssh_client: bool) -> tuple[DataSync, str]:
    """One upload of what changed; and tar's complaint when a file changed as it was read."""
    cfg, remote = m.cfg, m.remote
    torn = ""
    if not cfg.data.local_dir:
        raise ConfigError("--sync-data needs data.local_dir in the config")
    local = cfg.local_path(cfg.data.local_dir).resolve()
    if not local.is_dir():
        raise ConfigError(f"data.local_dir: {local} is not a folder")
    dest = m.data_dir
    start = time.perf_counter()
    if not dest.strip("/"):
        raise ConfigError("data.remote_dir: the data needs a folder of its own, not / (e.g. data or ~/features)")
    staging = f"{dest.rstrip('/')}/{layout.DATA_UPLOAD_DIR}/{layout.DATA_STAGING_PREFIX}{time.time_ns()}"
    method = "ssh" if use_ssh_client and remote.bulk_sessions and shutil.which("tar") else "channel"
    if method == "ssh":
        # ONE command lists the machine's files, then receives: connecting while the local walk goes on
        with children.scope(), m.bulk_session(verbs.DATA_RECEIVE, staging, dest, verbs.LISTING_FIRST,
                                              what="uploading the data") as (session, frame):
            answers = m.bulk_answers(session, frame)
            found, changed = _changes(lambda: _listing(m, answers.next(verbs.DATA_LIST), dest), local)
            if changed:
                code, said = _tar_into(session, local, [rel for rel, _ in changed])
                moved = answers.last(verbs.DATA_RECEIVE)  # read even so: a full disk there?
                if code not in (0, 1) and not moved.disk_full:  # a local cause: the stream was short
                    raise RemoteError(f"uploading the data to {remote.host} failed: {said}")
                _unpacked(m, moved, dest)
                if code == 1:  # GNU tar's "some files differ": a file changed as it was read
                    torn = said
    else:
        found, changed = _changes(lambda: _listing(m, m.answer(verbs.DATA_LIST, dest), dest), local)
        if changed:
            _unpacked(m, m.answer(verbs.DATA_RECEIVE, staging, dest,
                                  stdin=lambda fh: _write_tar(fh, local, [r for r, _ in changed])), dest)
    sent = sum(st.st_size for _, st in changed)
    seconds = time.perf_counter() - start
    m.log(f"data: {len(changed)} new or changed files ({sent / 1e6:.1f} MB) sent to {dest} in {seconds:.1f} s")
    if found.skipped:
        why = ", ".join(f"{n} {reason}" for reason, n in found.skipped.most_common())
        m.log(f"data: {found.skipped.total()} entries not sent ({why}); `python -m trainer check-data {local}` "
              "lists them")
    return DataSync(len(changed), sent, seconds, method, found.skipped.total()), torn


def _listing(m: Machine, answer: DataListing, dest: str) -> str:
    """The machine's listing of the data folder; another upload into it under way is BusyError."""
    _refuse_busy(m, answer.busy)
    return answer.listing


def _refuse_busy(m: Machine, busy: str | None) -> None:
    """Another upload into the data folder is under way (the machine's answer said so)."""
    if busy is not None:
        raise BusyError(f"{busy[:300]} on {m.remote.host}: wait for it to end, then sync again")


def _unpacked(m: Machine, moved: Moved, dest: str) -> None:
    """Raise what kept the machine from unpacking the upload (it moved nothing into place)."""
    _refuse_busy(m, moved.busy)
    if moved.disk_full:
        raise DiskFull(f"no space left on device on {m.remote.host} for the data in {dest}: free some space "
                       "(df -h) and sync again")
    if moved.error is not None:
        raise RemoteError(f"unpacking the data on {m.remote.host} failed: {moved.error[:300]}")


def _changes(machine_listing: Callable[[], str], local: Path
             ) -> tuple[_LocalFiles, list[tuple[bytes, os.stat_result]]]:
    """This computer's files, and those of them the machine lacks or has otherwise (size, mtime):
    the machine's listing (``data-list``'s, which also clears what an interrupted upload left in
    its staging folder) is awaited in a thread while the local folder is walked here."""
    pool = ThreadPoolExecutor(1)
    try:
        listing = pool.submit(machine_listing)
        found = _local_files(local)
        have = _parse_listing(listing.result())
    finally:  # Ctrl-C during the walk: no waiting here for the machine's listing (its connection ends it)
        pool.shutdown(wait=False, cancel_futures=True)
    changed = [(rel, st) for rel, st in found.files if have.get(rel) != (st.st_size, int(st.st_mtime))]
    return found, [(rel, st) for rel, st in changed if found.readable(local, rel)]


@dataclass
class _LocalFiles:
    """The regular files below the local data folder (a link: the file it leads to), with
    what was left out and why."""

    files: list[tuple[bytes, os.stat_result]] = field(default_factory=list)  # (relative name, stat)
    skipped: Counter[str] = field(default_factory=Counter)

    def readable(self, local: Path, rel: bytes) -> bool:
        """Whether the file opens for reading (O_NONBLOCK: never waits, whatever it became)."""
        try:
            os.close(os.open(os.path.join(os.fsencode(local), rel), os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            self.skipped["unreadable files"] += 1
            return False
        return True


def _local_files(local: Path) -> _LocalFiles:
    """Every regular file below ``local`` except hidden ones (caches, partial uploads); names
    as bytes. Like the trainer's loader: links to folders are not followed."""
    found = _LocalFiles()
    top = os.fsencode(local)

    def unreadable(_exc: OSError) -> None:
        found.skipped["unreadable folders"] += 1

    for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(b".")]
        for d in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            dirnames.remove(d)
            found.skipped["links to folders"] += 1
        # os.walk's folders all start with ``top`` as given: the relative name by slicing
        # (os.path.relpath and join per file: a third of orch's CPU in a first upload, bench/bench_sync.py)
        below, here = dirpath[len(top):].lstrip(b"/"), dirpath.rstrip(b"/") + b"/"
        below += b"/" if below else b""
        for name in filenames:
            if not name.startswith(b"."):
                _add_file(found, here + name, below + name)
    found.files.sort()
    return found


def _add_file(found: _LocalFiles, path: bytes, rel: bytes) -> None:
    try:
        st = os.stat(path)  # follows a link: its file's content is what is sent
    except OSError:
        found.skipped["links to nothing or looping" if os.path.islink(path) else "unreadable files"] += 1
        return
    if stat.S_ISREG(st.st_mode):
        found.files.append((rel, st))
    else:
        found.skipped["pipes, devices or sockets"] += 1


def _parse_listing(text: str) -> dict[bytes, tuple[int, int]]:
    """The machine's listing: base64 of NUL-separated (name, size, mtime) records."""
    fields = base64.b64decode(text.strip()).split(b"\0")[:-1]
    return {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields) - 2, 3)}


def _write_tar(fh: BinaryIO, local: Path, rels: list[bytes]) -> None:
    """The go byte, then the tar stream of ``rels`` (Python's tarfile: over paramiko's channel)."""
    fh.write(verbs.DATA_GO)
    # GNU format stores names as their bytes; dereference: a link travels as its file's content.
    with tarfile.open(fileobj=fh, mode="w|", format=tarfile.GNU_FORMAT, dereference=True) as tar:
        for rel in rels:
            tar.add(os.fsdecode(os.path.join(os.fsencode(local), rel)), arcname=os.fsdecode(rel), recursive=False)


def _tar_into(session: BulkSession, local: Path, rels: list[bytes]) -> tuple[int, str]:
    """The go byte, then `tar c` of ``rels`` straight into the session's stdin (OpenSSH moves
    bulk data about twice as fast as paramiko); then EOF there. Tar's exit code (1: a file
    changed as it was read, the stream is whole) and its last complaint."""
    session.write(verbs.DATA_GO)
    # -h: a link travels as its file's content. Names go NUL-separated, each after "./" so
    # that none is ever read as an option. Records of 1 MiB (-b 2048), as the machine reads them.
    # COPYFILE_DISABLE: macOS's bsdtar would add an AppleDouble ._name beside each file with metadata.
    tar = children.spawn(["tar", "-C", str(local), "-h", "-b", "2048", "--null", "-T", "-", "-cf", "-"],
                         stdin=subprocess.PIPE, stdout=session.stdin_fd(), stderr=subprocess.PIPE,
                         env={**os.environ, "COPYFILE_DISABLE": "1"})
    session.close_stdin()  # tar holds it now: when tar ends, the machine sees the end of the stream
    assert tar.stdin is not None
    tar_err = children.Tail(tar.stderr)  # bounded, never blocking
    with contextlib.suppress(BrokenPipeError):  # tar died: its exit status and stderr say why
        tar.stdin.write(b"".join(b"./" + r + b"\0" for r in rels))
        tar.stdin.close()
    code = tar.wait()
    return code, tar_err.last_line("tar failed") if code else ""
