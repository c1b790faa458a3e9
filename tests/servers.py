"""Throw-away servers on 127.0.0.1 for the tests and the benchmarks: an OpenSSH sshd with
its own host key, client key, config and port; a stand-in for EC2's instance metadata service
(IMDSv2, spot notices); a webhook that records what runs notify."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@contextmanager
def small_disk(path: Path, kib: int) -> Iterator[bool]:
    """A tmpfs of ``kib`` KiB at ``path`` (True), or False where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def processes_with(*words: str) -> list[int]:
    """The living processes (zombies are not) whose argv holds each of ``words``, each as one word."""
    from trainer.machine.proc import process_start_time

    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if proc.name.isdigit() and all(w in argv for w in words) and process_start_time(int(proc.name)) is not None:
            found.append(int(proc.name))
    return found


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


# --------------------------------------------------------------------------- IMDSv2


class ImdsStandIn:
    """EC2's instance metadata service as a spot instance sees it, IMDSv2 only: ``PUT
    /latest/api/token`` (with the TTL header) gives a token; every GET needs a valid one (401
    otherwise; a GET without any token is counted in ``tokenless_requests``, which IMDSv1 would
    send). ``instance-action`` and the rebalance recommendation answer 404 until the test posts
    them. ``respond(path, status, body)`` makes a path answer anything at all (a crafted answer)."""

    TOKEN = "/latest/api/token"
    INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
    REBALANCE = "/latest/meta-data/events/recommendations/rebalance"

    def __init__(self) -> None:
        import threading

        self.url = ""
        self.tokens: set[str] = set()
        self.tokenless_requests = 0
        self.token_requests = 0
        self.requests: list[tuple[str, str]] = []  # (method, path), in order
        self._answers: dict[str, tuple[int, bytes]] = {}
        self._lock = threading.Lock()

    def notice(self, action: str = "terminate", time: str | None = None) -> str:
        """Post a spot instance-action notice (default: terminate, two minutes from now); its time."""
        when = time or _iso_z(120)
        self.respond(self.INSTANCE_ACTION, 200, json.dumps({"action": action, "time": when}).encode())
        return when

    def rebalance(self, time: str | None = None) -> str:
        """Post a rebalance recommendation (default: now); its noticeTime."""
        when = time or _iso_z(0)
        self.respond(self.REBALANCE, 200, json.dumps({"noticeTime": when}).encode())
        return when

    def clear(self) -> None:
        """No notice, no recommendation (a new instance): every path answers 404 again."""
        with self._lock:
            self._answers.clear()

    def expire_tokens(self) -> None:
        """Every token given so far is no longer valid (their TTL ran out): GETs with them get 401."""
        with self._lock:
            self.tokens.clear()

    def respond(self, path: str, status: int, body: bytes) -> None:
        with self._lock:
            self._answers[path] = (status, body)

    def gets(self, path: str) -> int:
        """How many GETs of ``path`` came so far."""
        with self._lock:
            return sum(1 for method, p in self.requests if (method, p) == ("GET", path))

    def _handle(self, method: str, path: str, headers: Any) -> tuple[int, bytes]:
        import secrets

        with self._lock:
            self.requests.append((method, path))
            if method == "PUT" and path == self.TOKEN:
                if path in self._answers:  # respond() made the token service odd
                    return self._answers[path]
                ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not (ttl.isdigit() and 1 <= int(ttl) <= 21600):
                    return 400, b""
                token = secrets.token_urlsafe(42)
                self.tokens.add(token)
                self.token_requests += 1
                return 200, token.encode()
            if method != "GET":
                return 405, b""
            token = headers.get("X-aws-ec2-metadata-token")
            if token is None:
                self.tokenless_requests += 1
                return 401, b""
            if token not in self.tokens:
                return 401, b""
            return self._answers.get(path, (404, b""))


def _iso_z(seconds_from_now: float) -> str:
    from datetime import datetime, timedelta, timezone

    return (datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def imds_stand_in() -> Iterator[ImdsStandIn]:
    """An IMDSv2 stand-in on a free 127.0.0.1 port for the block (``imds.url`` is its address,
    what ec2.metadata_url names)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    imds = ImdsStandIn()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, body = imds._handle(self.command, self.path, self.headers)
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if body.startswith(b"{") else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = _answer

        def log_message(self, *_args: object) -> None:  # quiet: the tests read imds.requests
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: the kernel picks a free one, no race
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True, name="imds-stand-in")
    thread.start()
    imds.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield imds
    finally:
        server.shutdown()
        server.server_close()


# A webhook URL's secret part, as Slack's carry one in the path: the tests check it is never shown.
WEBHOOK_SECRET = "B0123/XOXsecretPATHtoken"


@dataclass
class WebhookStandIn:
    """A webhook on 127.0.0.1: records each POSTed JSON message and answers it with the next code
    of ``answers`` (then 200)."""

    answers: list[int]
    url: str = ""
    got: list[tuple[str, dict[str, Any], int]] = field(default_factory=list)  # (path, message, its answer)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def _take(self, path: str, body: bytes) -> int:
        with self.changed:
            code = self.answers.pop(0) if self.answers else 200
            self.got.append((path, json.loads(body), code))
            self.changed.notify_all()
            return code

    def taken(self, state: str) -> list[dict[str, Any]]:
        """The messages of ``state`` (what the run was: finished, failed...) answered 200."""
        return [msg for _path, msg, code in self.got if msg.get("state") == state and code == 200]

    def wait(self, state: str, count: int = 1, timeout: float = 300) -> list[dict[str, Any]]:
        """The first ``count`` messages of ``state`` taken, once they came (``timeout`` is a safety
        net for a hang: the wait ends on the messages)."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.taken(state)) >= count, timeout), self.got
            return self.taken(state)[:count]


@contextmanager
def webhook_stand_in(answers: list[int] | None = None) -> Iterator[WebhookStandIn]:
    """A webhook on a free 127.0.0.1 port for the block; ``hook.url`` carries WEBHOOK_SECRET."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hook = WebhookStandIn(list(answers or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            code = hook._take(self.path, self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True, name="webhook-stand-in").start()
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/services/T0/{WEBHOOK_SECRET}"
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
