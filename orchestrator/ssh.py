"""The machine over SSH: one paramiko connection (through the ProxyJump hosts, each hop checked
with orch's host-key policy, orchestrator/hostkeys.py), reused for every step of a command,
keepalive on. Bulk data goes through the OpenSSH client with the very same settings
(orchestrator/sshconfig.py): about twice as fast as paramiko."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from orchestrator import children
from orchestrator.errors import ConnectError, ConnectionLost, HostKeyError, RemoteError
from orchestrator.hostkeys import HostKey, VerifyNewHostKey, fingerprint, load_known_hosts
from orchestrator.remote import (
    MAX_STDERR,
    SESSION_EXIT_WAIT,
    Background,
    Reader,
    Remote,
    Session,
    Sink,
    Streams,
    Writer,
    feed,
)
from orchestrator.sshconfig import Hop, SshTarget, openssh_config
from orchestrator.transfer import BLOCK, Unframed
from trainer.contract.blocks import widen_pipe


class _ChannelBackground(Background):
    def __init__(self, chan: Any) -> None:
        self.chan = chan

    def write(self, data: bytes) -> None:
        self.chan.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.shutdown_write()
        self.chan.close()


class _ChannelSession(_ChannelBackground, Session):
    def __init__(self, chan: Any, host: str) -> None:
        _ChannelBackground.__init__(self, chan)
        Session.__init__(self)
        self.host = host

    def write(self, data: bytes) -> None:
        try:
            super().write(data)
        except (OSError, EOFError) as exc:
            self._check_connection(exc)
            raise OSError(f"the command has ended ({exc or type(exc).__name__})") from exc

    def read(self, timeout: float) -> bytes | None:
        import select
        import time

        chan, deadline = self.chan, time.monotonic() + timeout
        while True:
            if chan.recv_ready():
                return bytes(chan.recv(1 << 16))
            if chan.recv_stderr_ready():
                self.streams.err(chan.recv_stderr(1 << 16))
            elif chan.eof_received or chan.closed:
                for chunk in iter(lambda: chan.recv_stderr(1 << 16), b""):
                    self.streams.err(chunk)
                self._check_connection(None)
                return b""
            left = deadline - time.monotonic()
            if left <= 0:  # however much it prints on stderr meanwhile
                self._check_connection(None)
                return None
            select.select([chan], [], [], left)  # its fileno is readable on stdout, stderr and EOF

    def _check_connection(self, cause: BaseException | None) -> None:
        transport = self.chan.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionLost(f"the connection to {self.host} was lost") from cause

    def close(self) -> None:
        # EOF, then its exit (briefly): the command ends when its stdin does, and is gone when close returns.
        with contextlib.suppress(Exception):
            self.chan.shutdown_write()
            self.chan.status_event.wait(SESSION_EXIT_WAIT)
        self.chan.close()


class BulkSession:
    """A command on the machine through OpenSSH, its stdin and stdout held open: orch writes as
    it goes along (requests, a tar stream) and reads ``stdout`` (a file descriptor) as the
    answers come. ``first`` (the machine side's bundle) is written at once, in a thread, so that
    the connection and the remote interpreter start while orch does something else. Pipes of
    1 MiB where the system allows: ssh never waits on a reader that is hashing or writing."""

    def __init__(self, proc: subprocess.Popen[bytes], host: str, what: str, first: bytes) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc, self.host, self.what = proc, host, what
        self.stdout = proc.stdout.fileno()
        self.errors = children.Tail(proc.stderr, MAX_STDERR)
        self.finished = False
        for fd in (proc.stdin.fileno(), self.stdout):
            widen_pipe(fd)
        self._writer = threading.Thread(target=self._write_quietly, args=(first,), daemon=True)
        self._writer.start()

    def _write_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):  # ssh died: its exit status and stderr say why
            self._stdin().write(data)
            self._stdin().flush()

    def _stdin(self) -> Any:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def write(self, data: bytes) -> None:
        """``data`` to the command's stdin, after what was written before."""
        self._writer.join()
        try:
            self._stdin().write(data)
            self._stdin().flush()
        except (OSError, ValueError) as exc:
            raise self.failed(f"it stopped reading ({exc})", ended=True) from exc

    def stdin_fd(self) -> int:
        """The stdin pipe, for a child of orch to write into (a tar), after what was written before."""
        self._writer.join()
        return self._stdin().fileno()

    def close_stdin(self) -> None:
        """EOF on the command's stdin."""
        self._writer.join()
        with contextlib.suppress(OSError):
            self._stdin().close()

    def finish(self) -> int:
        """EOF on its stdin, then wait for it: its exit status (RemoteError when ssh itself failed)."""
        self.close_stdin()
        self.proc.wait()
        self.finished = True
        if self.proc.returncode == 255:  # ssh's own failure, or no exit status came (the command's otherwise)
            why = self.errors.last_line("the connection, or the command on the machine, ended abruptly (killed?)")
            raise RemoteError(f"{self.what} failed on {self.host}: {why}")
        return self.proc.returncode

    def failed(self, problem: str, *, ended: bool) -> RemoteError:
        """The error for a ``problem`` met while reading: ssh's own last words when it failed (a
        refused key, a lost connection); ``ended``: its output ended, so it is exiting."""
        if ended:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.kill()
        elif self.proc.returncode != 0:
            problem = self.errors.last_line(problem)
        return RemoteError(f"{self.what} failed on {self.host}: {problem}")

    def stderr_tail(self) -> str:
        self.errors.thread.join(timeout=10)
        return self.errors.data[-MAX_STDERR:].decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.finished = True


class SshRemote(Remote):
    """One SSH connection (paramiko), through the ProxyJump hosts if any."""

    def __init__(self, target: SshTarget, *, trusted_fingerprints: Callable[[], Iterable[str]] = tuple,
                 trust_new_host: bool = False, log: Callable[[str], None] = lambda _m: None) -> None:
        self.target = target
        self.host = target.hop.label
        self.accepted: list[HostKey] = []
        self._clients: list[Any] = []
        self._openssh_dir: tempfile.TemporaryDirectory[str] | None = None
        try:
            sock = None
            hops = (*target.jumps, target.hop)
            for i, hop in enumerate(hops):
                final = i == len(hops) - 1
                trusted = trusted_fingerprints if final else tuple  # the console lists the instance's keys only
                client = self._connect(hop, sock, trusted, trust_new_host, log)
                self._clients.append(client)
                if not final:
                    sock = self._tunnel(client, hops[i + 1])
        except BaseException:
            self.close()
            raise
        self.client = self._clients[-1]
        transport = self.client.get_transport()
        self.server_key = transport.get_remote_server_key()

    def _connect(self, hop: Hop, sock: Any, trusted: Callable[[], Iterable[str]], trust_new_host: bool,
                 log: Callable[[str], None]) -> Any:
        import paramiko

        t = self.target
        client = paramiko.SSHClient()
        revoked = load_known_hosts(client, t.known_hosts, log)
        # A revoked key is never known (so paramiko asks the policy), and the policy refuses it:
        # before authentication, whatever the flags.
        policy = VerifyNewHostKey(t.known_hosts, trusted, trust_new_host, log, revoked)
        client.set_missing_host_key_policy(policy)
        where = f"{hop.user}@{hop.label}" + (f" (via {', '.join(j.label for j in t.jumps)})" if t.jumps else "")
        try:
            client.connect(
                hop.hostname, port=hop.port, username=hop.user, key_filename=list(hop.key_files) or None,
                allow_agent=not hop.key_files, look_for_keys=not hop.key_files, sock=sock,
                timeout=t.connect_timeout, banner_timeout=t.connect_timeout, auth_timeout=t.connect_timeout,
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"the host key of {hop.label} CHANGED (known {fingerprint(exc.expected_key)}, offered "
                f"{fingerprint(exc.key)}): refusing to connect. If the machine was rebuilt, remove the "
                f"old key (ssh-keygen -f '{t.known_hosts}' -R '{hop.known_hosts_name}') and trust the new one"
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise ConnectError(f"authentication failed for {where}: check ssh.user and ssh.key_file "
                               "(or the keys in your ssh-agent)") from exc
        except (OSError, paramiko.SSHException) as exc:
            client.close()
            if "No authentication methods available" in str(exc):
                raise ConnectError(f"no SSH key to log in to {where} with: set ssh.key_file (or an IdentityFile in "
                                   "ssh.config_file), or add the key to ssh-agent") from exc
            raise ConnectError(f"cannot connect to {where}: {exc or type(exc).__name__}; is the machine "
                               "up and the port open?") from exc
        self.accepted += policy.accepted
        client.get_transport().set_keepalive(15)
        return client

    def _tunnel(self, client: Any, to: Hop) -> Any:
        """A channel from a jump host to the next hop (what ProxyJump does)."""
        import paramiko

        try:
            return client.get_transport().open_channel("direct-tcpip", (to.hostname, to.port), ("127.0.0.1", 0),
                                                       timeout=self.target.connect_timeout)
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"the jump host cannot reach {to.label}: {exc or type(exc).__name__}") from exc

    def _transport(self) -> Any:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionLost(f"the connection to {self.host} was lost")
        return transport

    def _session(self) -> Any:
        import paramiko

        try:
            return self._transport().open_session(timeout=self.target.connect_timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectionLost(f"the connection to {self.host} failed: {exc or type(exc).__name__}") from exc

    def _exec(self, command: str, write: Writer | None, timeout: float | None, streams: Streams) -> int:
        import paramiko

        chan = self._open(command)
        try:  # the channel is closed whatever happens (a failing stdin writer included)
            chan.settimeout(timeout)
            if write is not None:
                with chan.makefile_stdin("wb") as stdin:
                    write(stdin)
            chan.shutdown_write()
            _drain(chan, streams)
            code = chan.recv_exit_status()
            if code == -1:  # the channel closed without an exit status: the connection went away
                raise ConnectionLost(f"the connection to {self.host} was lost during a command")
            return code
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectionLost(f"the connection to {self.host} failed: {exc or type(exc).__name__}") from exc
        finally:
            # EOF first: a command still reading its stdin (the writer failed half-way) ends,
            # so sshd frees the session too (it allows 10 per connection).
            with contextlib.suppress(Exception):
                chan.shutdown_write()
            chan.close()

    def _open(self, command: str) -> Any:
        """A channel running ``command``."""
        import paramiko

        chan = self._session()
        try:
            chan.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            chan.close()
            raise ConnectionLost(f"the connection to {self.host} failed: {exc or type(exc).__name__}") from exc
        return chan

    def start(self, command: str) -> Background:
        return _ChannelBackground(self._open(command))

    def session(self, command: str) -> Session:
        return _ChannelSession(self._open(command), self.host)

    def interact(self, command: str, stdin: Reader | None, streams: Streams) -> int:
        import paramiko

        chan = self._session()
        try:
            chan.exec_command(command)
            if stdin is None:
                chan.shutdown_write()
            else:  # fed meanwhile: a command may answer before its input ends
                threading.Thread(target=feed, args=(stdin, chan.sendall, chan.shutdown_write), daemon=True).start()
            _drain(chan, streams)
            code = chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectionLost(f"the connection to {self.host} failed: {exc or type(exc).__name__}") from exc
        finally:
            chan.close()
        if code == -1:  # no exit status: the connection went away, or the command was killed by a signal
            self._transport()
            return 255  # what OpenSSH's client says for a command killed by a signal
        return code

    def tunnel(self, host: str, port: int) -> Any:
        """A channel to ``host:port`` as the machine sees it (``direct-tcpip`` over the control
        connection: what ``ssh -L`` does), for one forwarded connection."""
        import paramiko

        try:
            return self._transport().open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                                  timeout=self.target.connect_timeout)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectionLost(f"cannot reach {host}:{port} on {self.host} through the connection: "
                                 f"{exc or type(exc).__name__}") from exc

    def openssh_argv(self, *options: str) -> list[str]:
        """OpenSSH with the very settings of this connection (same hops, users, keys and
        known_hosts, strict host-key checking: the keys were verified when we connected), and
        ``options`` before the host. For bulk data (OpenSSH moves it about twice as fast as
        paramiko) and for `orch ssh`'s terminal."""
        if self._openssh_dir is None:
            self._openssh_dir = tempfile.TemporaryDirectory(prefix="orch-ssh-")
            Path(self._openssh_dir.name, "config").write_text(openssh_config(self.target))
        return ["ssh", "-F", str(Path(self._openssh_dir.name, "config")), *options, "orch-target"]

    @contextlib.contextmanager
    def _openssh(self, command: str, write: Writer | None, what: str) -> Iterator[Any]:
        """OpenSSH running ``command`` (it dies with orch), its stdin fed by ``write``: yields its
        stdout pipe. A failure, in the block or of ssh, is RemoteError with the last line of its stderr."""
        proc = children.spawn([*self.openssh_argv(), command], stdin=subprocess.PIPE if write else
                              subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        errors = children.Tail(proc.stderr, MAX_STDERR)
        widen_pipe(proc.stdout.fileno())  # type: ignore[union-attr]
        failed: BaseException | None = None
        done = False
        try:
            if write is not None:
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError):
                    write(proc.stdin)  # type: ignore[arg-type]
                    proc.stdin.close()
            assert proc.stdout is not None
            yield proc.stdout
            done = True
        except RemoteError as exc:
            failed = exc
        finally:
            if done:  # its output is read: ssh ends by itself (anything else, Ctrl-C included, kills it)
                proc.wait()
            killed = proc.poll() is None
            if killed:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        if failed is not None and killed:  # orch stopped it, for the reason it gives
            raise RemoteError(f"{what} failed on {self.host}: {failed}") from failed
        if proc.returncode != 0 or failed is not None:  # what ssh said (a refused key, a lost connection) says more
            why = errors.last_line(str(failed) if failed else f"exit code {proc.returncode}")
            raise RemoteError(f"{what} failed on {self.host}: {why}") from failed

    @property
    def bulk_sessions(self) -> bool:
        return shutil.which("ssh") is not None

    @contextlib.contextmanager
    def bulk_session(self, command: str, first: bytes = b"", what: str = "a command") -> Iterator[BulkSession]:
        """``command`` through OpenSSH, its pipes held open (:class:`BulkSession`); killed at the end
        of the block unless the block finished it (an interruption, or it was never needed)."""
        proc = children.spawn([*self.openssh_argv(), command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        session = BulkSession(proc, self.host, what, first)
        try:
            yield session
        finally:
            if not session.finished:
                session.kill()
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()  # type: ignore[union-attr]

    def stream(self, command: str, frame: str, sink: Sink, *, write: Writer | None = None,
               what: str = "reading from the machine") -> None:
        if not shutil.which("ssh"):
            return super().stream(command, frame, sink, write=write, what=what)
        unframed = Unframed(frame, sink)
        with self._openssh(command, write, what) as out:  # OpenSSH: bulk data at twice paramiko's speed
            for chunk in iter(lambda: os.read(out.fileno(), BLOCK), b""):
                unframed.feed(chunk)
        if not unframed.found:
            raise RemoteError(f"{what} failed on {self.host}: its output never began (no frame line)")

    def close(self) -> None:
        for client in reversed(self._clients):
            client.close()
        if self._openssh_dir is not None:
            self._openssh_dir.cleanup()


def _drain(chan: Any, streams: Streams) -> None:
    """Read stdout and stderr to the end, as they come, without deadlocking on a full stderr window."""
    import select

    while True:
        if chan.recv_ready():
            streams.out(chan.recv(1 << 16))
        elif chan.recv_stderr_ready():
            streams.err(chan.recv_stderr(1 << 16))
        elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            break
        else:
            select.select([chan], [], [], 1.0)
    # Anything left in the buffers after the exit status arrived.
    for chunk in iter(lambda: chan.recv(1 << 16), b""):
        streams.out(chunk)
    for chunk in iter(lambda: chan.recv_stderr(1 << 16), b""):
        streams.err(chunk)


