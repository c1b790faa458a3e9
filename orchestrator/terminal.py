"""Text from the machine (logs, errors, GPU names, file and run names), made safe to show on a
terminal: every control character but tab and newline, C1 controls included, and the Unicode
controls that reorder or hide text, are shown escaped (``\\x1b``, ``\\u202e``), so no escape
sequence (a window title, a clipboard write, a cleared screen) reaches the terminal. JSON
output needs no such step: its strings are written with ``ensure_ascii``, exact and inert."""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str) -> str:
    """``text`` with every unsafe character shown escaped (fast when there is none)."""
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text
