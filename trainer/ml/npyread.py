"""Reading the .npy and .npz files numpy writes straight from their bytes: no zipfile object,
no ``ast`` parse of the header, no copy of the data (the array is a view of the bytes).

Only the plain layouts are read here: numpy's own header (C order, a numeric dtype), and
archives as ``np.savez``/``np.savez_compressed`` write them (stored or deflated members, no
zip64 records, no comment, nothing before the first member, no extra fields in the directory).
Each is checked at least as strictly as numpy and zipfile check it, the member's CRC-32
included. For anything else these functions answer None and the caller takes the general path
(numpy and zipfile themselves), so an odd or broken file gets exactly their diagnostics: this
module may only ever be stricter than they are, never more lenient (tests/unit/test_npyread.py
compares both on every truncation and every flipped byte of sample files).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np

Buffer = bytes | memoryview

_MAGIC = b"\x93NUMPY"
# The header numpy has written since format 1.0: keys sorted, repr'd values, spaces, a newline.
_HEADER = re.compile(
    rb"\{'descr': '([<>|=][fiu][1248])', 'fortran_order': False, 'shape': \((\d+,|\d+(?:, \d+)+|)\), \} *\n")
_HEADER_LENGTH = {(1, 0): struct.Struct("<H"), (2, 0): struct.Struct("<I"), (3, 0): struct.Struct("<I")}
MAX_HEADER = 10000  # numpy refuses longer headers without allow_pickle

# zipfile's own record layouts (structEndArchive, structCentralDir, structFileHeader).
_END = struct.Struct("<4s4H2LH")
_DIRECTORY = struct.Struct("<4s4B4HL2L5H2L")
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_END_SIG, _DIRECTORY_SIG, _LOCAL_SIG, _ZIP64_LOCATOR_SIG = b"PK\x05\x06", b"PK\x01\x02", b"PK\x03\x04", b"PK\x06\x07"
_ZIP64_LOCATOR = 20
_UTF8_NAME = 0x800
_REFUSED_FLAGS = 0x01 | 0x20 | 0x40  # encrypted, compressed patch data, strong encryption
_STORED, _DEFLATED = 0, 8
_MAX_EXTRACT_VERSION = 63  # zipfile's MAX_EXTRACT_VERSION


@lru_cache(maxsize=64)
def _dtype(descr: bytes) -> np.dtype:
    return np.dtype(descr.decode("ascii"))


def npy_array(buf: Buffer) -> np.ndarray | None:
    """The array of .npy bytes, a read-only view of ``buf``; None unless the layout is plain.
    Bytes after the data are ignored, as numpy ignores them."""
    view = memoryview(buf)
    if len(view) < 10 or view[:6] != _MAGIC:
        return None
    length = _HEADER_LENGTH.get((view[6], view[7]))
    if length is None or len(view) < 8 + length.size:
        return None
    start = 8 + length.size
    header_len = length.unpack_from(view, 8)[0]
    match = _HEADER.fullmatch(view, start, start + header_len) if header_len <= MAX_HEADER else None
    if match is None:
        return None
    try:
        dtype = _dtype(match[1])
    except TypeError:  # a descriptor numpy does not know: its own parser says so
        return None
    shape = tuple(int(d) for d in match[2].split(b",") if d)
    count = 1
    for d in shape:
        count *= d
    data = start + header_len
    if len(view) - data < count * dtype.itemsize:
        return None
    return np.frombuffer(view, dtype, count, data).reshape(shape)


def npz_array(buf: Buffer, choose: Callable[[list[str]], str | None]) -> tuple[str, np.ndarray] | None:
    """The array ``choose`` picks among an archive's ``.npy`` members (given without the suffix,
    in the archive's order), with its name; None unless the archive and the member are plain."""
    view = memoryview(buf)
    directory = _directory(view)
    if directory is None:
        return None
    names, members, offsets, start_dir = directory
    key = choose([n[:-4] for n in names if n.endswith(".npy")])
    if key is None:
        return None
    flags, method, crc, packed, size, offset, raw_name = members[key + ".npy"]
    payload = _member(view, offset, raw_name, flags, method, packed, size, _end_of(offset, offsets, start_dir))
    if payload is None or zlib.crc32(payload) != crc:
        return None
    # The whole member is CRC checked; zipfile checks it only when numpy's reads reach the
    # member's end, so a member zipfile would pass with a bad CRC falls back: the same answer.
    array = npy_array(payload)
    return None if array is None else (key, array)


Member = tuple[int, int, int, int, int, int, bytes]  # flags, method, crc, packed size, size, offset, raw name


def _directory(view: memoryview) -> tuple[list[str], dict[str, Member], list[int], int] | None:
    """The names (in order), the members (the last of a name wins, as in zipfile) and every
    member's header offset of a plain archive, and where its central directory starts."""
    n = len(view)
    if n < _END.size:
        return None
    sig, _disk, _disk_dir, _here, _total, dir_size, dir_offset, comment = _END.unpack_from(view, n - _END.size)
    end = n - _END.size
    if sig != _END_SIG or comment or dir_offset != end - dir_size:  # nothing before the archive
        return None
    if n >= _END.size + _ZIP64_LOCATOR and view[end - _ZIP64_LOCATOR : end - _ZIP64_LOCATOR + 4] == _ZIP64_LOCATOR_SIG:
        return None
    names: list[str] = []
    members: dict[str, Member] = {}
    offsets: list[int] = []
    pos = dir_offset
    while pos < end:
        if pos + _DIRECTORY.size > end:
            return None
        (sig, _cv, _cs, extract_version, _r, flags, method, _t, _d, crc, packed, size,
         name_len, extra_len, comment_len, _disk, _ia, _ea, offset) = _DIRECTORY.unpack_from(view, pos)
        name_end = pos + _DIRECTORY.size + name_len
        if sig != _DIRECTORY_SIG or extra_len or extract_version > _MAX_EXTRACT_VERSION or \
                name_end + comment_len > end:
            return None
        raw_name = bytes(view[pos + _DIRECTORY.size : name_end])
        try:
            name = raw_name.decode("utf-8" if flags & _UTF8_NAME else "cp437")
        except UnicodeDecodeError:
            return None
        if "\0" in name:  # zipfile cuts a name at a NUL
            return None
        names.append(name)
        members[name] = (flags, method, crc, packed, size, offset, raw_name)
        offsets.append(offset)
        pos = name_end + comment_len
    return (names, members, offsets, dir_offset) if pos == end else None


def _end_of(offset: int, offsets: list[int], start_dir: int) -> int:
    """Where the member at ``offset`` must end: the next member's header, or the directory
    (newer zipfile versions refuse overlapping members)."""
    return min((o for o in offsets if o > offset), default=start_dir)


def _member(view: memoryview, offset: int, raw_name: bytes, flags: int, method: int, packed: int, size: int,
            limit: int) -> Buffer | None:
    """A member's uncompressed bytes, when its local header agrees with the directory."""
    if flags & _REFUSED_FLAGS or method not in (_STORED, _DEFLATED) or offset + _LOCAL.size > limit:
        return None
    sig, _v, _s, local_flags, _m, _t, _d, _crc, _packed, _size, name_len, extra_len = _LOCAL.unpack_from(view, offset)
    start = offset + _LOCAL.size + name_len + extra_len
    if sig != _LOCAL_SIG or (local_flags ^ flags) & _UTF8_NAME or \
            view[offset + _LOCAL.size : offset + _LOCAL.size + name_len] != raw_name or start + packed > limit:
        return None
    data = view[start : start + packed]
    if method == _STORED:
        return data if packed == size else None
    inflate = zlib.decompressobj(-15)
    try:
        out = inflate.decompress(data, size + 1)
    except zlib.error:
        return None
    return out if inflate.eof and not inflate.unused_data and len(out) == size else None
