"""``target: local``: the machine is this computer; the same shell commands, run by /bin/sh."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from pathlib import Path

from orchestrator.errors import RemoteError
from orchestrator.remote import Background, LineFeed, Progress, Remote, Result, Writer
from orchestrator.transfer import copy_hashing


class _LocalBackground(Background):
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


class LocalRemote(Remote):
    def __init__(self, cwd: Path) -> None:
        self.host = "localhost"
        self.cwd = cwd

    def _exec(self, command: str, write: Writer | None, timeout: float | None, lines: LineFeed | None) -> Result:
        proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=self.cwd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if write is not None:
                write(proc.stdin)  # type: ignore[arg-type]
        except BrokenPipeError:
            pass  # the command exited early; its exit code and stderr say why
        finally:
            proc.stdin.close()
            proc.stdin = None  # communicate() must not flush what we closed
        if lines is None:
            out, err = proc.communicate(timeout=timeout)
        else:  # stderr in a thread, stdout line by line here
            stdout, stderr = proc.stdout, proc.stderr
            assert stderr is not None
            errs: list[bytes] = []
            reader = threading.Thread(target=lambda: errs.append(stderr.read()), daemon=True)
            reader.start()
            out = b"".join(lines.feed(chunk) for chunk in iter(lambda: stdout.read1(1 << 16), b""))
            proc.wait(timeout=timeout)
            reader.join()
            err = errs[0] if errs else b""
        return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))

    def start(self, command: str) -> Background:
        return _LocalBackground(subprocess.Popen(["/bin/sh", "-c", command], cwd=self.cwd, stdin=subprocess.PIPE,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def fetch(self, path: str, local: Path, progress: Progress | None = None) -> str:
        try:
            with open(path, "rb") as src:
                return copy_hashing(src, local, progress)
        except OSError as exc:
            raise RemoteError(f"cannot read {path}: {exc.strerror}") from exc
