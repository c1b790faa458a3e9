"""Text from the machine (logs, errors, GPU names, file and run names), made safe to show on a
terminal: every control character but tab and newline, C1 controls included, and the Unicode
controls that reorder or hide text, are shown escaped (``\\x1b``, ``\\u202e``), so no escape
sequence (a window title, a clipboard write, a cleared screen) reaches the terminal. JSON
output needs no such step: its strings are written with ``ensure_ascii``, exact and inert."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any

_UNSAFE = [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), 0x061C, *range(0x200B, 0x2010),
           *range(0x2028, 0x202F), *range(0x2060, 0x2065), *range(0x2066, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFC),
           *range(0xE0000, 0xE0080)]
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _UNSAFE}


_PLAIN = bytes(range(0x20, 0x7F)) + b"\t\n"  # printable ASCII: safe as it is


def clean(text: str) -> str:
    """``text`` with every unsafe character shown escaped (fast when there is none)."""
    if not text.isascii():
        return text.translate(_ESCAPES)
    for code in set(text.encode("ascii").translate(None, _PLAIN)):  # usually none: at memory speed
        text = text.replace(chr(code), _ESCAPES[code])
    return text


class OutputClosed(Exception):
    """What this command's output went into was closed (``orch exec -- cat log | head``): not an
    OSError, so no transport takes it for a failing connection."""


def byte_sink(stream: Any) -> Callable[[bytes], None]:
    """Where the bytes a command on the machine prints go, on this side's ``stream``: on a terminal,
    decoded as they come (a character split between two chunks waits for its end) and cleaned;
    into a pipe or a file, exactly as they came (they are data there, and no terminal reads them)."""
    binary = getattr(stream, "buffer", None)
    if binary is not None and not stream.isatty():
        def write_bytes(chunk: bytes) -> None:
            binary.write(chunk)
            binary.flush()

        return _closing(write_bytes)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    shown = clean if stream.isatty() else str  # a text stream without bytes (a test's StringIO) gets the text

    def write_text(chunk: bytes) -> None:
        text = decoder.decode(chunk)
        if text:
            stream.write(shown(text))
            stream.flush()

    return _closing(write_text)


def _closing(write: Callable[[bytes], None]) -> Callable[[bytes], None]:
    def sink(chunk: bytes) -> None:
        try:
            write(chunk)
        except BrokenPipeError as exc:
            raise OutputClosed(str(exc)) from exc

    return sink
