"""Throw-away servers on 127.0.0.1 for the tests and the benchmarks: an OpenSSH sshd with
its own host key, client key, config and port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def keygen(path: Path) -> str:
    """A new ed25519 key pair; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "orch-test", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip() if path.suffix else Path(f"{path}.pub").read_text().strip()


def fingerprint_of(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True, capture_output=True, text=True)
    return out.stdout.split()[1]


@dataclass
class Sshd:
    port: int
    dir: Path
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    host_fingerprint: str  # "SHA256:..."
    client_key: Path
    proc: subprocess.Popen[bytes]

    def known_hosts_line(self) -> str:
        kind, b64 = self.host_key_pub.split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {b64}\n"


@contextmanager
def start_sshd(d: Path, log_level: str = "ERROR", extra_config: str = "") -> Iterator[Sshd]:
    """Run sshd in the foreground on a free loopback port until the block ends (its log:
    ``d/sshd.log``; DEBUG1 records every forwarded connection). ``extra_config``: more
    sshd_config lines (e.g. `SetEnv PATH=...` for what the machine's sessions see)."""
    if not Path(SSHD).exists():
        raise RuntimeError("OpenSSH sshd is not installed: apt-get install openssh-server (.ci/run does)")
    d.mkdir(parents=True, exist_ok=True)
    host_key = d / "ssh_host_ed25519_key"
    host_pub = keygen(host_key)
    client_key = d / "client_key"
    (d / "authorized_keys").write_text(keygen(client_key) + "\n")
    port = free_port()
    (d / "sshd_config").write_text(f"""
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin yes
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
LogLevel {log_level}
{extra_config}
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    try:
        wait_port(port)
        yield Sshd(port, d, host_pub, fingerprint_of(Path(f"{host_key}.pub")), client_key, proc)
    finally:
        proc.terminate()
        proc.wait(10)


def ssh_deploy_config(sshd: Sshd, work: Path, **data: str) -> object:
    """A DeployConfig for the loopback sshd whose host key is already trusted."""
    from orchestrator.config import DeployConfig

    known_hosts = work / "known_hosts"
    if not known_hosts.exists():
        known_hosts.write_text(sshd.known_hosts_line())
    return DeployConfig.model_validate({
        "target": "ssh", "base_dir": work,
        "ssh": {"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
                "key_file": str(sshd.client_key), "known_hosts": str(known_hosts)},
        "remote": {"root": str(work / "remote"), "python": os.sys.executable},
        "data": data,
    })


_PEAK = ("import os, subprocess, sys\n"
         "with open(sys.argv[1], 'wb') as out:\n"
         "    proc = subprocess.Popen(sys.argv[2:], stdout=out, stderr=subprocess.PIPE)\n"
         "    _, status, usage = os.wait4(proc.pid, 0)\n"
         "sys.stderr.buffer.write(proc.stderr.read())\n"
         "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n")


def peak_rss(argv: list[str], stdout: str = os.devnull, env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """(exit code, peak RSS in KB, stderr) of ``argv``, its stdout into ``stdout``. Started from a
    small helper process: a child forked from a big one (a test worker that imported TensorFlow)
    would count the parent's pages until its exec."""
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK, stdout, *argv], capture_output=True, text=True, env=env)
    code, rss = done.stdout.split()
    return int(code), int(rss), done.stderr


class TcpRelay:
    """A TCP relay on 127.0.0.1 to a local port that a test can cut: :meth:`cut` drops every
    connection through it and refuses new ones (a network gone), :meth:`mend` lets them in again."""

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        self.is_cut = False
        self.refused = 0  # connections refused while cut
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                if self.is_cut:
                    self.refused += 1
                    conn.close()
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port))
                except OSError:
                    conn.close()
                    continue
                self.open += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            self.is_cut = True
            for s in self.open:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.open = []

    def mend(self) -> None:
        with self.lock:
            self.is_cut = False

    def close(self) -> None:
        self.cut()
        self.server.close()
