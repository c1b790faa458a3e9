"""Bytes from the machine into a local file, hashed on the way (never read twice)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.remote import Progress
from trainer.contract.files import hash_stream


class _Counter:
    def __init__(self, progress: Progress | None) -> None:
        self.done, self.progress = 0, progress

    def __call__(self, block: bytes) -> None:
        self.done += len(block)
        if self.progress is not None:
            self.progress(self.done)


def copy_hashing(src: Any, local: Path, progress: Progress | None) -> str:
    """``src`` (a readable file) into ``local``; its sha256."""
    count = _Counter(progress)
    with open(local, "wb") as out:

        def write(block: bytes) -> None:
            out.write(block)
            count(block)

        return hash_stream(src, on_block=write).hexdigest()


def hash_growing(local: Path, proc: subprocess.Popen[bytes], progress: Progress | None) -> str:
    """sha256 of a file another process is still writing, read as it grows, until it exits."""
    count = _Counter(progress)
    with open(local, "rb") as fh:
        h = None
        while True:
            finished = proc.poll() is not None  # look before reading: then nothing is missed
            h = hash_stream(fh, h, count)
            if finished:
                return h.hexdigest()
            time.sleep(0.005)
