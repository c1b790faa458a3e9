"""127.0.0.1:PORT on this computer, carried to a port of the machine through the control
connection (each connection one ``direct-tcpip`` channel, as ``ssh -L`` does; no process of its
own). Threads in orch: they end when it is closed, and with orch however it ends.

A thread accepts, one pumps each connection both ways; all of them also watch one wake-up
pipe, so closing ends them at once on any system (closing a socket another thread waits on
does not wake it everywhere).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from orchestrator.errors import ConfigError, OrchError

CHUNK = 1 << 16


class Forwarder:
    """Listens on 127.0.0.1:``port`` (0: any free port; ``any_port``: a free one when ``port`` is
    taken) and carries each connection through ``open_channel()`` (a socket-like object with
    ``fileno``, ``recv``, ``sendall`` and ``close``)."""

    def __init__(self, open_channel: Callable[[], Any], port: int, *, any_port: bool = False) -> None:
        self.open_channel = open_channel
        self.listener = _listen(port, any_port)
        self.port: int = self.listener.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe()
        self._closed = threading.Event()
        self.threads: list[threading.Thread] = []
        self.failures: list[str] = []  # channels that could not be opened (shown once it ends)
        self._start(self._accept, "orch-forward")

    def _start(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=name)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            ready = select.select([self.listener, self._wake_r], [], [])[0]
            if self._wake_r in ready:
                return
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            try:
                chan = self.open_channel()
            except OrchError as exc:  # the machine's side refused it: this connection fails, the others go on
                self.failures.append(str(exc))
                conn.close()
                continue
            self._start(self._pump, "orch-forward-conn", conn, chan)

    def _pump(self, conn: socket.socket, chan: Any) -> None:
        """Both ways until either side ends (or the forwarder closes)."""
        try:
            while True:
                ready = select.select([conn, chan, self._wake_r], [], [])[0]
                if self._wake_r in ready:
                    return
                if conn in ready:
                    data = conn.recv(CHUNK)
                    if not data:
                        return
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(CHUNK)
                    if not data:
                        return
                    conn.sendall(data)
        except OSError:
            return  # either side went away
        finally:
            conn.close()
            chan.close()

    def close(self) -> None:
        """Stop listening, end every connection, and wait for the threads."""
        if self._closed.is_set():
            return
        self._closed.set()
        os.write(self._wake_w, b"x")
        for thread in self.threads:
            thread.join(10)
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listen(port: int, any_port: bool) -> socket.socket:
    """A listening socket on 127.0.0.1 (never another interface: the machine's port is its own)."""
    try:
        return _bound(port)
    except OSError as exc:
        if not (any_port and exc.errno == errno.EADDRINUSE):
            raise ConfigError(f"cannot listen on 127.0.0.1:{port} here: {exc.strerror or exc}; "
                              "choose another port with --port") from exc
    return _bound(0)


def _bound(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port of the last run, in TIME_WAIT
        sock.bind(("127.0.0.1", port))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock
