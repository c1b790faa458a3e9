"""TensorBoard's event files, derived from the committed history like metrics.jsonl
(trainer/contract/layout.py): one file per writer (``tensorboard/train/``,
``tensorboard/validation/``), with one event per committed epoch at step ``offset + epoch``.
Epochs count from 1 as in metrics.jsonl; an extended run's ``offset`` is its parent's best epoch
(in the parent's own steps), so its curves go on from the weights it starts from.

Each publish brings a file in line with the history: what it holds is read back (our own
records, each checked), cut after the longest prefix that agrees with the history (a record a
kill left half-written, or anything else), and the missing epochs are appended in place, as
TensorBoard expects of a growing event file. So a kill at any moment never leaves a duplicate
or a gap for the next start, and an epoch that was never committed is never shown. The files
change while the run trains: the manifest lists them only in a final state.

Standard library only: records framed as TFRecords (length, masked CRC-32C, data, masked
CRC-32C), each an ``Event`` protocol buffer encoded here (wall_time, step, file_version, or a
summary of ``simple_value`` scalars), which TensorBoard reads without TensorFlow.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trainer.contract import layout

FILE_VERSION = b"brain.Event:2"
# Keras's tag names, so the dashboards read as they always did: (metrics.jsonl key, tag) per writer.
TAGS: dict[str, tuple[tuple[str, str], ...]] = {
    layout.TENSORBOARD_TRAIN: (("loss", "epoch_loss"), ("accuracy", "epoch_accuracy"), ("lr", "epoch_learning_rate")),
    layout.TENSORBOARD_VALIDATION: (("val_loss", "epoch_loss"), ("val_accuracy", "epoch_accuracy")),
}


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use it."""
    c = 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, scalars: Sequence[tuple[str, float]] = (), version: bool = False) -> bytes:
    """An ``Event``: wall_time (1), step (2), then file_version (3) or a summary (5) of scalars."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if version:
        out += _field(3, FILE_VERSION)
    if scalars:  # Summary.value (1): Value{tag (1), simple_value (2, a float)}
        out += _field(5, b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                                  for tag, value in scalars))
    return out


def read_steps(data: bytes) -> Iterator[tuple[int, int | None]]:
    """(end offset, step of a summary event, or None for another event) of each whole, intact
    record of ``data``, up to the first that is not."""
    at = 0
    while at + 12 <= len(data):
        header = data[at:at + 8]
        if struct.unpack("<I", data[at + 8:at + 12])[0] != masked_crc(header):
            return
        end = at + 12 + struct.unpack("<Q", header)[0] + 4
        if end > len(data):
            return
        payload = data[at + 12:end - 4]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc(payload):
            return
        try:
            yield end, _summary_step(payload)
        except (IndexError, ValueError):
            return
        at = end


def _summary_step(payload: bytes) -> int | None:
    """The step of an event that carries a summary (None: another kind of event)."""
    step, summary, at = 0, False, 0
    while at < len(payload):
        key, at = _read_varint(payload, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, at = _read_varint(payload, at)
            if number == 2:
                step = value
        elif kind == 1:
            at += 8
        elif kind == 5:
            at += 4
        elif kind == 2:
            size, at = _read_varint(payload, at)
            at += size
            summary = summary or number == 5
        else:
            raise ValueError(f"wire type {kind}")
    if at != len(payload):
        raise ValueError("truncated event")
    return step if summary else None


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


class EventFiles:
    """The run's event files, kept in line with its committed history (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.written: dict[str, list[int]] = {}  # writer file -> the steps it holds (read once per process)

    def publish(self, history: Sequence[dict[str, Any]], offset: int) -> None:
        """Append the epochs of ``history`` the files lack (after cutting whatever disagrees)."""
        wanted = [offset + int(row["epoch"]) for row in history]
        for rel, tags in TAGS.items():
            if self.written.get(rel) == wanted:
                continue
            path = self.run_dir / rel
            kept, at, size = self._agreeing(path, rel, wanted)
            if kept == len(wanted) and at == size > 0:
                self.written[rel] = list(wanted)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            now = time.time()
            with open(path, "r+b" if path.exists() else "w+b") as fh:
                fh.truncate(at)
                fh.seek(at)
                if at == 0:
                    fh.write(record(event(now, 0, version=True)))
                for row, step in zip(history[kept:], wanted[kept:], strict=True):
                    fh.write(record(event(now, step, scalars=[(tag, float(row[key])) for key, tag in tags
                                                              if isinstance(row.get(key), (int, float))])))
                fh.flush()
                os.fsync(fh.fileno())
            self.written[rel] = list(wanted)

    def _agreeing(self, path: Path, rel: str, wanted: list[int]) -> tuple[int, int, int]:
        """(how many epochs of ``wanted`` the file holds in order, the byte offset after them, its size)."""
        known = self.written.get(rel)
        if known is not None and known == wanted[:len(known)]:  # what this process wrote: no need to read it
            size = path.stat().st_size
            return len(known), size, size
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0, 0, 0
        kept, at = 0, 0
        for end, step in read_steps(data):
            if step is None:
                if kept == 0:
                    at = end  # the file_version header (or another event before the first epoch)
                continue
            if kept == len(wanted) or step != wanted[kept]:
                break
            kept, at = kept + 1, end
        return kept, at, len(data)
