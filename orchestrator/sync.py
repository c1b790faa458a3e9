"""Ship the trainer code (content-addressed, once per version) and the data (only what
changed, never a half-written file in place) to the machine."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError, RemoteError
from orchestrator.remote import Remote, SshRemote, q
from trainer import layout
from trainer.codeversion import code_files, code_version

Log = Callable[[str], None]
_COMPLETE = ".complete"


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


def sync_code(remote: Remote, cfg: DeployConfig, log: Log) -> CodeSync:
    """Make ROOT/code/<version>/ exist on the machine; transfer only if it does not yet."""
    bundle = code_bundle()
    root = remote.expand(cfg.remote_root)
    code_dir = f"{root}/{layout.CODE_DIR}/{bundle.version}"
    transferred = remote.run(f"test -e {q(code_dir + '/' + _COMPLETE)}", check=False).code != 0
    if transferred:
        payload = bundle.tar_gz()
        log(f"sending code version {bundle.version} ({len(payload) / 1024:.0f} KiB)")
        # Unpack beside, then rename, under a lock: a half-sent bundle never becomes a code
        # version, and two deploys at once never remove each other's.
        remote.run(f"{q(cfg.helper_python)} -c {q(_UNPACK_CODE)} {q(root)} {q(bundle.version)}",
                   write=lambda fh: fh.write(payload), what="unpacking the code")
    return CodeSync(bundle.version, code_dir, transferred)


@dataclass(frozen=True)
class DataSync:
    files: int  # files sent
    bytes: int
    seconds: float
    method: str  # "ssh" (tar over the OpenSSH client) | "channel" (tar over our connection)


def sync_data(remote: Remote, cfg: DeployConfig, log: Log, *, use_ssh_client: bool = True) -> DataSync:
    """Upload data.local_dir to data.remote_dir: new or changed files only (size and mtime).

    One listing, then ONE tar stream of what changed into a hidden staging folder beside the
    data, then one rename per file on the machine: an interruption leaves no partial file
    under a final name, and running it again finishes the job.
    """
    if not cfg.data.local_dir:
        raise ConfigError("--sync-data needs data.local_dir in the config")
    local = cfg.local_path(cfg.data.local_dir).resolve()
    if not local.is_dir():
        raise ConfigError(f"data.local_dir: {local} is not a folder")
    dest = remote.expand(cfg.remote_data_dir)
    python = cfg.helper_python
    start = time.perf_counter()
    parent, name = dest.rstrip("/").rsplit("/", 1)
    incoming = f".{name}.orch-incoming-"
    # Also clears what an interrupted upload left in its staging folder.
    listing = remote.run(f"rm -rf -- {q(parent)}/{q(incoming)}*; mkdir -p {q(dest)} && "
                         f"{q(python)} -c {q(_LIST)} {q(dest)}", what="listing the data").stdout
    have = {}
    for line in listing.splitlines():
        rel, size, mtime = line.rsplit("\t", 2)
        have[rel] = (int(size), int(mtime))
    changed_stats = [(rel, st) for rel, st in _local_files(local) if have.get(rel) != (st.st_size, int(st.st_mtime))]
    changed = [rel for rel, _ in changed_stats]
    over_openssh = isinstance(remote, SshRemote) and shutil.which("ssh") and shutil.which("tar")
    method = "ssh" if use_ssh_client and over_openssh else "channel"
    if changed:
        # A hidden sibling of the data folder: same file system, never read as data.
        staging = f"{parent}/{incoming}{time.time_ns()}"
        # The trap: an upload cut off mid-way removes its own staging folder when its tar fails
        # (a later sync's clean-up may run before this one has noticed the cut).
        unpack = (f"set -e; trap {q('rm -rf -- ' + q(staging))} EXIT; mkdir -p {q(staging)}; "
                  f"tar -xf - -C {q(staging)}; {q(python)} -c {q(_MOVE)} {q(staging)} {q(dest)}")
        if method == "ssh":
            _tar_over_ssh_client(remote, local, changed, unpack)  # type: ignore[arg-type]
        else:
            remote.run(unpack, write=lambda fh: _write_tar(fh, local, changed), what="unpacking the data")
    sent = sum(st.st_size for _, st in changed_stats)
    seconds = time.perf_counter() - start
    log(f"data: {len(changed)} new or changed files ({sent / 1e6:.1f} MB) sent to {dest} in {seconds:.1f} s")
    return DataSync(len(changed), sent, seconds, method)


def _local_files(local: Path) -> list[tuple[str, os.stat_result]]:
    """Every file below ``local`` except hidden ones (caches, partial uploads)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath, name)
                out.append((path.relative_to(local).as_posix(), path.stat()))
    return sorted(out)


def _write_tar(fh: BinaryIO, local: Path, rels: list[str]) -> None:
    with tarfile.open(fileobj=fh, mode="w|") as tar:
        for rel in rels:
            tar.add(local / rel, arcname=rel, recursive=False)


def _tar_over_ssh_client(remote: SshRemote, local: Path, rels: list[str], unpack: str) -> None:
    """`tar c | ssh host unpack`: OpenSSH moves bulk data about twice as fast as paramiko."""
    tar = subprocess.Popen(["tar", "-C", str(local), "--null", "-T", "-", "-cf", "-"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ssh = subprocess.Popen([*remote.openssh_argv(), unpack], stdin=tar.stdout, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    assert tar.stdin is not None and tar.stdout is not None
    tar.stdout.close()  # ssh holds it now; tar sees SIGPIPE if ssh dies
    tar.stdin.write(b"\0".join(r.encode() for r in rels) + b"\0")
    tar.stdin.close()
    _, ssh_err = ssh.communicate()
    tar_err = tar.stderr.read() if tar.stderr else b""
    tar.wait()
    if tar.returncode != 0 or ssh.returncode != 0:
        why = (ssh_err or tar_err).decode(errors="replace").strip().splitlines()
        raise RemoteError(f"uploading the data to {remote.host} failed: {why[-1] if why else 'no message'}")


_UNPACK_CODE = f"""\
import fcntl, os, shutil, sys, tarfile
root, version = sys.argv[1:3]
folder = os.path.join(root, {layout.CODE_DIR!r})
os.makedirs(folder, exist_ok=True)
lock = os.open(os.path.join(folder, '.lock'), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(lock, fcntl.LOCK_EX)
final = os.path.join(folder, version)
if os.path.exists(os.path.join(final, {_COMPLETE!r})):
    sys.stdin.buffer.read()
    sys.exit()
tmp = final + '.tmp-%d' % os.getpid()
shutil.rmtree(tmp, ignore_errors=True)
with tarfile.open(fileobj=sys.stdin.buffer, mode='r|gz') as tar:
    tar.extractall(tmp)
open(os.path.join(tmp, {_COMPLETE!r}), 'w').close()
shutil.rmtree(final, ignore_errors=True)
os.rename(tmp, final)
"""
_LIST = ("import os,sys\nroot=sys.argv[1]\nfor d,ds,fs in os.walk(root):\n"
         " ds[:]=[x for x in ds if not x.startswith('.')]\n"
         " for f in fs:\n  p=os.path.join(d,f);s=os.stat(p)\n"
         "  print(os.path.relpath(p,root),s.st_size,int(s.st_mtime),sep='\\t')\n")
# Into an empty data folder, the staging folder is renamed as a whole; otherwise each file is
# renamed into place (os.replace: atomic per file).
_MOVE = ("import os,sys,shutil\nsrc,dst=sys.argv[1],sys.argv[2]\n"
         "if not os.listdir(dst):\n os.rmdir(dst);os.rename(src,dst);sys.exit()\n"
         "for d,ds,fs in os.walk(src):\n"
         " t=os.path.join(dst,os.path.relpath(d,src));os.makedirs(t,exist_ok=True)\n"
         " for f in fs:\n  os.replace(os.path.join(d,f),os.path.join(t,f))\n"
         "shutil.rmtree(src)\n")
