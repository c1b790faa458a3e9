"""Ship the trainer code (content-addressed, once per version) and the data (only what
changed, never a half-written file in place) to the machine."""

from __future__ import annotations

import hashlib
import io
import shlex
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError, RemoteError
from orchestrator.remote import LocalRemote, Remote, SshRemote, q, which
from trainer import layout

SETUP_LOG = "setup.log"
_COMPLETE = ".complete"
_SETUP_DONE = ".setup-done"


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
    """The trainer package (sources + requirements.txt), named by the hash of its content."""
    import trainer

    package = Path(trainer.__file__).parent
    files = {
        f"trainer/{p.relative_to(package).as_posix()}": p.read_bytes()
        for p in sorted(package.rglob("*"))
        if p.is_file() and (p.suffix == ".py" or p.name == "requirements.txt") and "__pycache__" not in p.parts
    }
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    return CodeBundle(h.hexdigest()[:12], files)


@dataclass(frozen=True)
class CodeSync:
    version: str
    path: str  # absolute code folder on the machine (its parent of trainer/)
    transferred: bool
    setup_ran: bool


def sync_code(remote: Remote, cfg: DeployConfig, log: callable) -> CodeSync:
    """Make ROOT/code/<version>/ exist on the machine; transfer only if it does not yet."""
    bundle = code_bundle()
    root = remote.expand(cfg.remote_root)
    code_dir = f"{root}/{layout.CODE_DIR}/{bundle.version}"
    probe = remote.run(f"cd {q(code_dir)} 2>/dev/null && ls -a", check=False).stdout.split()
    transferred = _COMPLETE not in probe
    if transferred:
        payload = bundle.tar_gz()
        log(f"sending code version {bundle.version} ({len(payload) / 1024:.0f} KiB)")
        tmp = f"{code_dir}.tmp-{time.time_ns()}"
        # Unpack beside, then rename: a half-sent bundle never becomes a code version.
        remote.run(
            f"set -e; mkdir -p {q(tmp)}; tar -xzf - -C {q(tmp)}; touch {q(tmp + '/' + _COMPLETE)}; "
            f"rm -rf {q(code_dir)}; mv {q(tmp)} {q(code_dir)}",
            write=lambda fh: fh.write(payload), what="unpacking the code",
        )
    else:
        log(f"code version {bundle.version} already on the machine")
    setup_ran = False
    if cfg.remote.setup and (transferred or _SETUP_DONE not in probe):
        log(f"running remote.setup for code version {bundle.version}")
        # remote.setup is the user's own shell command: it is run as written, on purpose.
        result = remote.run(f"cd {q(code_dir)} && ( {cfg.remote.setup} ) > {SETUP_LOG} 2>&1 && touch {_SETUP_DONE}",
                            check=False)
        if result.code != 0:
            tail = remote.run(f"tail -n 5 {q(code_dir + '/' + SETUP_LOG)}", check=False).stdout.strip()
            raise RemoteError(f"remote.setup failed (exit {result.code}); last lines of "
                              f"{code_dir}/{SETUP_LOG}: {' | '.join(tail.splitlines())}")
        setup_ran = True
    return CodeSync(bundle.version, code_dir, transferred, setup_ran)


@dataclass(frozen=True)
class DataSync:
    files: int  # files sent
    bytes: int
    seconds: float
    method: str  # "rsync" | "tar"


def sync_data(remote: Remote, cfg: DeployConfig, log: callable) -> DataSync:
    """Upload data.local_dir to data.remote_dir: new or changed files only (size and mtime),
    each written under a temporary name and renamed, so an interruption leaves no partial file."""
    if not cfg.data.local_dir:
        raise ConfigError("--sync-data needs data.local_dir in the config")
    local = cfg.local_path(cfg.data.local_dir).resolve()
    if not local.is_dir():
        raise ConfigError(f"data.local_dir: {local} is not a folder")
    dest = remote.expand(cfg.remote_data_dir)
    start = time.perf_counter()
    if which("rsync") and remote.run("command -v rsync", check=False).code == 0:
        files, sent = _rsync(remote, local, dest)
        method = "rsync"
    else:
        files, sent = _tar_changed(remote, cfg, local, dest)
        method = "tar"
    seconds = time.perf_counter() - start
    log(f"data: {files} files ({sent / 1e6:.1f} MB) sent to {dest} in {seconds:.1f} s ({method})")
    return DataSync(files, sent, seconds, method)


def _ssh_command(remote: SshRemote) -> list[str]:
    """OpenSSH with the very settings of our paramiko connection (same key, same known_hosts,
    strict host key checking: the key was verified when we connected)."""
    t = remote.target
    cmd = ["ssh", "-p", str(t.port), "-l", t.user, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
           "-o", f"UserKnownHostsFile={t.known_hosts}", "-o", f"ConnectTimeout={int(t.connect_timeout)}",
           "-o", "ServerAliveInterval=15"]
    if t.key_file:
        cmd += ["-i", t.key_file, "-o", "IdentitiesOnly=yes"]
    return cmd


def _rsync(remote: Remote, local: Path, dest: str) -> tuple[int, int]:
    remote.run(f"mkdir -p {q(dest)}", what="creating the data folder")
    # -a keeps mtimes (the "unchanged" test next time); rsync writes each file to a temp
    # name and renames it, and never keeps partial files.
    args = ["rsync", "-a", "--exclude=.*", "--stats", f"{local}/"]
    if isinstance(remote, SshRemote):
        args[1:1] = ["-e", shlex.join(_ssh_command(remote))]
        target = f"{remote.target.host}:{dest}/"
    elif isinstance(remote, LocalRemote):
        target = f"{dest}/"
    else:  # pragma: no cover - only two kinds of Remote exist
        raise RemoteError("rsync is not supported for this target")
    proc = subprocess.run([*args, target], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise RemoteError(f"rsync to {remote.host} failed: {lines[-1] if lines else proc.returncode}")
    return _stat(proc.stdout, "Number of regular files transferred"), _stat(proc.stdout, "Total transferred file size")


def _stat(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split(":", 1)[1].split()[0].replace(",", ""))
    return 0


_LIST = ("import os,sys\nroot=sys.argv[1]\nfor d,ds,fs in os.walk(root):\n"
         " ds[:]=[x for x in ds if not x.startswith('.')]\n"
         " for f in fs:\n  p=os.path.join(d,f);s=os.stat(p)\n"
         "  print(os.path.relpath(p,root),s.st_size,int(s.st_mtime),sep='\\t')\n")
_MOVE = ("import os,sys,shutil\nsrc,dst=sys.argv[1],sys.argv[2]\nfor d,ds,fs in os.walk(src):\n"
         " for f in fs:\n  a=os.path.join(d,f);b=os.path.join(dst,os.path.relpath(a,src))\n"
         "  os.makedirs(os.path.dirname(b),exist_ok=True);os.replace(a,b)\n"
         "shutil.rmtree(src)\n")


def _tar_changed(remote: Remote, cfg: DeployConfig, local: Path, dest: str) -> tuple[int, int]:
    """Without rsync: one listing, one tar stream of what changed into a hidden staging
    folder beside the data, then one rename per file on the machine."""
    python = cfg.remote_python
    listing = remote.run(f"mkdir -p {q(dest)} && {q(python)} -c {q(_LIST)} {q(dest)}", what="listing the data").stdout
    have = {}
    for line in listing.splitlines():
        rel, size, mtime = line.rsplit("\t", 2)
        have[rel] = (int(size), int(mtime))
    changed = [p for p in sorted(local.rglob("*"))
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)
               and have.get(p.relative_to(local).as_posix()) != (p.stat().st_size, int(p.stat().st_mtime))]
    if not changed:
        return 0, 0
    staging = f"{dest}/.orch-incoming-{time.time_ns()}"

    def write(fh: BinaryIO) -> None:
        with tarfile.open(fileobj=fh, mode="w|") as tar:
            for p in changed:
                tar.add(p, arcname=p.relative_to(local).as_posix(), recursive=False)

    remote.run(f"set -e; mkdir -p {q(staging)}; tar -xf - -C {q(staging)}; "
               f"{q(python)} -c {q(_MOVE)} {q(staging)} {q(dest)}", write=write, what="unpacking the data")
    return len(changed), sum(p.stat().st_size for p in changed)
