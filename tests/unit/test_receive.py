"""The machine's end of a data upload (trainer/machine/receive.py), run as orch runs it (`python
-m trainer.machine FRAME data-receive ...`, a tar stream on stdin): the staging folder lives in
the data folder's hidden .orch-upload/ (one file system, even for a mount point); a name that is
a folder on one side and a file on the other moves nothing; one upload into a folder at a time."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from trainer.contract import layout, verbs
from trainer.contract.wire import DataListing, Moved
from trainer.machine.locks import lock

FRAME = "f00d"


def upload(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return verbs.DATA_GO + buf.getvalue()


def machine(*args: str | Path, stdin: bytes = b"") -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "trainer.machine", FRAME, *map(str, args)], input=stdin,
                         capture_output=True, check=True).stdout.decode()
    return [json.loads(part.split("\n", 1)[0]) for part in out.split(f"{FRAME} answer ")[1:]]


def staging_of(dest: Path) -> Path:
    return dest / layout.DATA_UPLOAD_DIR / f"{layout.DATA_STAGING_PREFIX}1"


def test_an_upload_is_staged_inside_the_data_folder_and_moved_into_place(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    listing, moved = machine("data-receive", staging_of(dest), dest, verbs.LISTING_FIRST,
                             stdin=upload({"a/x.npy": b"1", "y.npy": b"22"}))
    assert DataListing.from_json(listing).listing == "" and Moved.from_json(moved).files == 2
    assert (dest / "a" / "x.npy").read_bytes() == b"1" and (dest / "y.npy").read_bytes() == b"22"
    assert not list((dest / layout.DATA_UPLOAD_DIR).glob(f"{layout.DATA_STAGING_PREFIX}*"))
    # the second upload's listing names the data, never orch's hidden folder
    [listing] = machine("data-list", dest)
    assert b".orch-upload" not in base64.b64decode(DataListing.from_json(listing).listing)


def test_a_name_that_is_a_folder_on_one_side_and_a_file_on_the_other_moves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    (dest / "speaker1").mkdir(parents=True)
    (dest / "speaker1" / "kept.npy").write_bytes(b"old")
    (dest / "flat.npy").write_bytes(b"file")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dest / "linked").symlink_to(elsewhere)  # the upload must never land outside the data folder
    for files, name in (({"new.npy": b"n", "speaker1": b"now a file"}, "speaker1"),
                        ({"new.npy": b"n", "flat.npy/inner.npy": b"now a folder"}, "flat.npy"),
                        ({"new.npy": b"n", "linked/inner.npy": b"through a link"}, "linked")):
        [moved] = machine("data-receive", staging_of(dest), dest, stdin=upload(files))
        got = Moved.from_json(moved)
        assert got.files == 0 and f"{name!r} is a folder in the upload but a file or a link on the machine" in \
            (got.error or "")
        assert not list(elsewhere.iterdir())
        assert not (dest / "new.npy").exists()  # nothing moved, not even what did not clash
        assert (dest / "speaker1" / "kept.npy").read_bytes() == b"old" and (dest / "flat.npy").read_bytes() == b"file"
        assert not staging_of(dest).exists()


def test_one_upload_into_a_data_folder_at_a_time(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    (dest / layout.DATA_UPLOAD_DIR).mkdir(parents=True)
    left = staging_of(dest)  # what an interrupted upload left
    left.mkdir()
    (left / "half.npy").write_bytes(b"h")
    fd = lock(dest / layout.DATA_UPLOAD_DIR / layout.DATA_UPLOAD_LOCK)  # another upload under way
    try:
        [listing] = machine("data-list", dest)
        assert DataListing.from_json(listing).busy == f"another upload into {dest} is under way"
        assert left.is_dir()  # its staging is not cleared under it
        [moved] = machine("data-receive", dest / layout.DATA_UPLOAD_DIR / "incoming-2", dest,
                          stdin=upload({"z.npy": b"z"}))
        assert Moved.from_json(moved).busy == f"another upload into {dest} is under way"
        assert not (dest / "z.npy").exists()
    finally:
        os.close(fd)
    older = tmp_path / ".data.orch-incoming-123"  # an older orch's staging, beside the data folder
    older.mkdir()
    [listing] = machine("data-list", dest)  # it ended: the next upload clears what it (and an older orch) left
    assert DataListing.from_json(listing).busy is None and not left.exists() and not older.exists()
