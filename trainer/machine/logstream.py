"""A run's train.log as a framed stream (verb ``log``):

    log RUN_DIR OFFSET [--follow]

prints the frame line, then train.log's bytes from OFFSET on, moved by the kernel (sendfile),
at the transport's speed and in constant memory; with --follow it goes on sending what is
appended while the run is active, then what came last. A run folder that is a link, or a
train.log that is not a regular file, is refused (exit 2, one line on stderr). Standard library only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.machine.probe import describe_run
from trainer.machine.readers import open_regular

BLOCK = 1 << 20
POLL = 0.5  # seconds between looks at a followed log


def send(src: int, dst: int, offset: int) -> int:
    """Everything of ``src`` from ``offset`` to its current end into ``dst``; the new offset."""
    while True:
        try:
            sent = os.sendfile(dst, src, offset, BLOCK)
        except OSError:  # a destination sendfile cannot write to: the plain way
            data = os.pread(src, BLOCK, offset)
            sent = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
        if sent == 0:
            return offset
        offset += sent


def reader_gone(fd: int) -> bool:
    """Whether nobody reads ``fd`` any more (the pipe's other end closed: POLLERR)."""
    import select

    if not hasattr(select, "poll"):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def stream(run_dir: Path, offset: int, follow: bool, out: Any) -> int:
    if run_dir.is_symlink() or not run_dir.is_dir():
        sys.stderr.write(f"{run_dir} is not a run folder of its own (a link, or missing)\n")
        return 2
    try:
        log = open_regular(run_dir / layout.TRAIN_LOG)
    except FileNotFoundError:
        log = None  # no log yet: nothing to send, unless it comes while following
    except OSError as exc:
        sys.stderr.write(f"{run_dir / layout.TRAIN_LOG}: {exc.strerror}\n")
        return 2
    dst = out.stream()
    active = True
    while True:
        if log is None and (run_dir / layout.TRAIN_LOG).exists():
            log = open_regular(run_dir / layout.TRAIN_LOG)
        if log is not None:
            offset = send(log.fileno(), dst, offset)
        if not follow or not active:
            return 0
        active = describe_run(run_dir).active  # one more send after the run ended: nothing is missed
        if active:
            if reader_gone(dst):  # orch went away (Ctrl-C): a stalled run must not keep this alive
                return 0
            time.sleep(POLL)


def run(verb: str, argv: list[str], out: Any) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "--follow"):
        raise SystemExit("usage: python3 -m trainer.machine FRAME log RUN_DIR OFFSET [--follow]")
    return stream(Path(argv[0]), int(argv[1]), len(argv) == 3, out)
