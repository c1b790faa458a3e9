"""The one way orch runs code on the machine:

    python3 -m trainer.machine FRAME VERB [ARGS...]

VERB is one of trainer/contract/verbs.py; only the module that answers it is imported. FRAME is
a token orch makes up for each call (``-``: nobody reads the output). A verb answers once, and
may report progress before; each is ONE line on stdout:

    <FRAME> progress "<text>"
    <FRAME> answer {<a record of trainer/contract/wire.py>}

or, for a verb that streams (a log), the frame line ``<FRAME> stream`` and then raw bytes; a
verb that converses (``Verb.converses``: monitor's snapshots) answers once per question line
orch writes on its stdin, until that ends.

Anything else that reaches stdout (a login shell's greeting, an interpreter's warning) is
outside every frame, and orch ignores it. Standard library only.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import select
import sys
from collections.abc import Iterator
from typing import Any

from trainer.contract.verbs import ANSWER, NO_FRAME, PROGRESS, STREAM, VERBS

MAX_QUESTION = 4096  # bytes of one question line (orch's are a few words)


class Channel:
    """Where a verb's answer (and progress) goes: framed lines on stdout."""

    def __init__(self, frame: str) -> None:
        self.frame = frame

    def _say(self, kind: str, payload: Any) -> None:
        if self.frame != NO_FRAME:
            sys.stdout.write(f"\n{self.frame} {kind} {json.dumps(payload)}\n")
            sys.stdout.flush()

    def answer(self, record: Any) -> None:
        self._say(ANSWER, dataclasses.asdict(record) if dataclasses.is_dataclass(record) else record)

    def progress(self, text: str) -> None:
        self._say(PROGRESS, text)

    def questions(self, idle: float, max_line: int = MAX_QUESTION) -> Iterator[str]:
        """The lines orch writes on stdin, each as it comes, until stdin ends (orch closed it, or
        is gone: its connection, or its process) or none came for ``idle`` seconds (nobody asks any
        more: a connection that vanished without a word must not keep this process). A line
        longer than ``max_line`` ends it too: orch writes short ones."""
        pending = b""
        while True:
            while b"\n" not in pending:
                if len(pending) > max_line or not select.select([0], [], [], idle)[0]:
                    return
                chunk = os.read(0, 4096)
                if not chunk:
                    return
                pending += chunk
            line, pending = pending.split(b"\n", 1)
            yield line.decode(errors="replace")

    def stream(self) -> int:
        """Start a framed stream: the frame line, then raw bytes to the end on the returned fd."""
        sys.stdout.write(f"\n{self.frame} {STREAM}\n")
        sys.stdout.flush()
        return sys.stdout.fileno()


def usage() -> str:
    verbs = "\n".join(f"  {v.name:<12} {v.summary}" for v in VERBS.values())
    return f"usage: python3 -m trainer.machine FRAME VERB [ARGS...]\nverbs:\n{verbs}\n"


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in VERBS:
        sys.stderr.write(usage())
        return 2
    frame, verb = argv[0], VERBS[argv[1]]
    module = importlib.import_module(f"trainer.machine.{verb.module}")
    return int(module.run(verb.name, argv[2:], Channel(frame)))
