"""The loader's own .npy/.npz reader (trainer/ml/npyread.py) against numpy and zipfile: on
every truncation and every flipped byte of small files of each layout, the loader answers
exactly what numpy and zipfile answer (the same array, or the same error), and it does read
the plain layouts itself."""

import io
import re
import zipfile
from pathlib import Path

import numpy as np

from tests.conftest import frames, write_npy
from trainer.ml.arrays import _choose_key, load_array, read_array
from trainer.ml.data import load_dataset
from trainer.ml.framestore import FrameStore
from trainer.ml.npyread import npy_array, npz_array


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version)
    return buf.getvalue()


def _npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _zip(members: list[tuple[str, bytes]], comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        zf.comment = comment
    return buf.getvalue()


SMALL = np.arange(6, dtype=np.float32).reshape(2, 3)
PLAIN = {  # read by the loader itself
    "f4.npy": _npy(SMALL),
    "f8-big-endian-1d.npy": _npy(np.arange(3, dtype=">f8")),
    "i2-layers.npy": _npy(np.arange(12, dtype=np.int16).reshape(2, 2, 3)),
    "version-2.npy": _npy(SMALL, (2, 0)),
    "two-members.npz": _npz(other=SMALL + 1, emb=SMALL),
    "compressed.npz": _npz(True, emb=SMALL),
    "empty.npz": _npz(emb=np.zeros((0, 3), np.float32)),
    "scalar.npy": _npy(np.float32(1)),
}
GENERAL = {  # left to numpy and zipfile
    "fortran.npy": _npy(np.asfortranarray(SMALL.T)),
    "bool.npy": _npy(np.ones((2, 3), bool)),
    "commented.npz": _zip([("emb.npy", _npy(SMALL))], comment=b"hello"),
    "prefixed.npz": b"junk" + _npz(emb=SMALL),
    "zip-named.npy": _npz(emb=SMALL),
}


def _answer(fn, path: Path) -> tuple:
    try:
        key, array = fn(path)
    except Exception as exc:  # ast's messages name objects by their (varying) address
        return type(exc).__name__, re.sub(r"0x[0-9a-f]+", "0x?", str(exc))
    return key, array.dtype.str, array.shape, array.tobytes()


def _variants(data: bytes):
    """The file, cut at every byte and with every byte flipped; inside a run of equal bytes (the
    header's padding, zeros) one position stands for the others."""
    yield data
    for n in range(len(data)):
        if 0 < n < len(data) - 1 and data[n - 1] == data[n] == data[n + 1]:
            continue
        yield data[:n]
        yield data[:n] + bytes([data[n] ^ 0xFF]) + data[n + 1 :]


def test_the_loader_answers_what_numpy_and_zipfile_answer_on_every_damage(tmp_path: Path) -> None:
    read_by_loader = 0
    for name, data in {**PLAIN, **GENERAL}.items():
        path = tmp_path / name
        for variant in _variants(data):
            path.write_bytes(variant)
            assert _answer(lambda p: read_array(str(p)), path) == _answer(load_array, path), (name, variant)
            parsed = npy_array(variant) if name.endswith(".npy") else npz_array(variant, _choose_key)
            read_by_loader += parsed is not None
    # The plain files are read by the loader itself (some damaged ones too: a flip in the data
    # of a .npy is invisible to numpy as well); the others never are.
    for name, data in PLAIN.items():
        assert (npy_array(data) if name.endswith(".npy") else npz_array(data, _choose_key)) is not None, name
    for name, data in GENERAL.items():
        assert (npy_array(data) if name.endswith(".npy") else npz_array(data, _choose_key)) is None, name
    assert read_by_loader > 2 * len(PLAIN)


def test_compressed_archives_grow_the_store_and_load_like_plain_files(tmp_path: Path) -> None:
    # Zeros compress ~100x: the store reserved from the file sizes is far too small and grows.
    for i in range(4):
        array = np.zeros((20 + i, 64), np.float32)
        array[0] = i
        buf = _npz(True, emb=array)
        (tmp_path / "z" / f"cremad_100{i}_TSI_HAP_XX.npz").parent.mkdir(exist_ok=True)
        (tmp_path / "z" / f"cremad_100{i}_TSI_HAP_XX.npz").write_bytes(buf)
        write_npy(tmp_path / "p" / f"cremad_100{i}_TSI_HAP_XX.npy", array)
    packed, plain = load_dataset(tmp_path / "z", use_cache=False), load_dataset(tmp_path / "p", use_cache=False)
    assert [(s.offset, s.length) for s in packed.samples] == [(s.offset, s.length) for s in plain.samples]
    np.testing.assert_array_equal(packed.frames, plain.frames)
    assert packed.frames.shape == (86, 64)


def test_frame_store_grows_and_keeps_what_was_committed() -> None:
    store = FrameStore((3,), capacity=1, source_frame_bytes=12)
    pieces = [frames(n, 3, seed=n) for n in (2, 1, 4)]
    offsets = [store.append(p) for p in pieces]
    store.slot(5)[...] = np.nan  # written, never committed: not part of the data
    assert offsets == [0, 2, 3]
    np.testing.assert_array_equal(store.array(), np.concatenate(pieces).astype(np.float16))
