"""The stream of the ``send`` verb (trainer/machine/sendfiles.py), which `orch download` reads
(orchestrator/transfer.py: FileStream): after its frame line, one block per request, in turn.
A block is a header of BLOCK_HEADER ASCII bytes, then the bytes it announces: b"%020d" (that
many bytes follow: a file, or a record as JSON) or b"E%019d" (what was asked cannot be sent: a
message of that many bytes follows). Standard library only.
"""

from __future__ import annotations

BLOCK_HEADER = 20
MAX_BLOCK_ERROR = 4096  # bytes of an error message


def block_header(size: int, *, error: bool = False) -> bytes:
    return (b"E%019d" if error else b"%020d") % size


def parse_block_header(raw: bytes) -> tuple[int, bool] | None:
    """(size, whether it announces an error message) of a block header; None if it is not one."""
    error = raw[:1] == b"E"
    digits = raw[1:] if error else raw
    if len(raw) != BLOCK_HEADER or not digits.isdigit() or (error and int(digits) > MAX_BLOCK_ERROR):
        return None
    return int(digits), error


def widen_pipe(fd: int) -> None:
    """Make ``fd``'s pipe hold 1 MiB where the system lets it (Linux): the program at its other
    end goes on while this one is busy (hashing, writing a file), in fewer, larger steps."""
    import os
    import stat

    try:
        import fcntl

        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass
