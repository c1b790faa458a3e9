"""Odd entries in a data folder: only regular files are samples, everything else is skipped
with a reason (never a crash, never a hang), and any valid POSIX file name loads."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import frames, write_npy
from trainer.ml.arrays import load_array
from trainer.ml.checkdata import render, report
from trainer.ml.data import load_dataset
from trainer.ml.dataset import SkipReason
from trainer.ml.split import load_split, make_split, save_split

ROOT = Path(__file__).resolve().parents[2]
GOOD = "cremad_1001_TSI_HAP_XX.npy"


def data_dir(path: Path) -> Path:
    """One ordinary sample, so every odd entry is judged beside a good one."""
    write_npy(path / GOOD, frames(3, 8))
    return path


def skipped(ds: Any) -> dict[str, tuple[SkipReason, str]]:
    return {s.rel: (s.reason, s.detail) for s in ds.skipped}


def test_a_link_to_a_regular_file_is_followed_and_counted(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "d")
    target = write_npy(tmp_path / "elsewhere" / "x.npy", frames(4, 8, value=2.0))
    (d / "cremad_1002_TSI_SAD_XX.npy").symlink_to(target)
    ds = load_dataset(d, use_cache=False)
    assert sorted(s.rel for s in ds.samples) == [GOOD, "cremad_1002_TSI_SAD_XX.npy"]
    assert ds.scan.links == 1 and ds.skipped == []
    assert report(ds)["links"] == 1


def test_a_symlink_loop_is_skipped(tmp_path: Path) -> None:
    d = data_dir(tmp_path)
    (d / "cremad_1002_TSI_SAD_XX.npy").symlink_to(d / "cremad_1003_TSI_SAD_XX.npy")
    (d / "cremad_1003_TSI_SAD_XX.npy").symlink_to(d / "cremad_1002_TSI_SAD_XX.npy")
    (d / "self.npz").symlink_to(d / "self.npz")
    ds = load_dataset(d, use_cache=False)
    assert [s.rel for s in ds.samples] == [GOOD]
    assert {rel: r for rel, (r, _) in skipped(ds).items()} == {
        "cremad_1002_TSI_SAD_XX.npy": SkipReason.SYMLINK_LOOP, "cremad_1003_TSI_SAD_XX.npy": SkipReason.SYMLINK_LOOP,
        "self.npz": SkipReason.SYMLINK_LOOP}


def test_a_dangling_link_is_skipped(tmp_path: Path) -> None:
    d = data_dir(tmp_path)
    (d / "cremad_1002_TSI_SAD_XX.npy").symlink_to(tmp_path / "gone.npy")
    ds = load_dataset(d, use_cache=False)
    assert [s.rel for s in ds.samples] == [GOOD]
    assert skipped(ds) == {"cremad_1002_TSI_SAD_XX.npy": (SkipReason.DANGLING_LINK, str(tmp_path / "gone.npy"))}


@pytest.mark.timeout(30)
def test_a_named_pipe_is_skipped_and_never_opened(tmp_path: Path) -> None:
    d = data_dir(tmp_path)
    os.mkfifo(d / "cremad_1002_TSI_SAD_XX.npy")
    ds = load_dataset(d, use_cache=False)  # opening the pipe would wait for a writer forever
    assert skipped(ds) == {"cremad_1002_TSI_SAD_XX.npy": (SkipReason.SPECIAL_FILE, "named pipe")}
    # ... and a file replaced by a pipe after the walk is refused at open, not waited on
    with pytest.raises(OSError, match="not a regular file"):
        load_array(d / "cremad_1002_TSI_SAD_XX.npy")


def test_devices_are_skipped(tmp_path: Path) -> None:
    d = data_dir(tmp_path)
    (d / "cremad_1002_TSI_SAD_XX.npy").symlink_to("/dev/zero")  # reading it would never end
    kinds = {"cremad_1002_TSI_SAD_XX.npy": "character device"}
    if os.geteuid() == 0:
        os.mknod(d / "cremad_1003_TSI_SAD_XX.npz", 0o600 | 0o020000, os.makedev(1, 5))  # another /dev/zero
        kinds["cremad_1003_TSI_SAD_XX.npz"] = "character device"
    ds = load_dataset(d, use_cache=False)
    assert skipped(ds) == {rel: (SkipReason.SPECIAL_FILE, kind) for rel, kind in kinds.items()}


def test_a_socket_is_skipped(tmp_path: Path) -> None:
    d = data_dir(tmp_path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(d / "cremad_1002_TSI_SAD_XX.npy"))
        ds = load_dataset(d, use_cache=False)
    assert skipped(ds) == {"cremad_1002_TSI_SAD_XX.npy": (SkipReason.SPECIAL_FILE, "socket")}


def test_a_link_to_a_folder_is_not_followed(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "d")
    write_npy(tmp_path / "more" / "cremad_1002_TSI_SAD_XX.npy", frames(2, 8))
    (d / "more").symlink_to(tmp_path / "more")
    (d / "loop").symlink_to(d)  # a link to an ancestor would walk forever if followed
    ds = load_dataset(d, use_cache=False)
    assert [s.rel for s in ds.samples] == [GOOD]
    assert {rel: r for rel, (r, _) in skipped(ds).items()} == {"more": SkipReason.LINKED_FOLDER,
                                                                "loop": SkipReason.LINKED_FOLDER}


@contextlib.contextmanager
def world_readable_tmp() -> Iterator[Path]:
    """A temp folder another user can reach (pytest's own is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="orch-odd-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            with contextlib.suppress(OSError):
                p.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)


def unprivileged(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child running as nobody when we are root (root reads everything)."""
    if os.geteuid() != 0:
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, send the result back, never return
        code = 0
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result: Any = ("ok", fn())
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            result = ("error", repr(exc))
        try:
            os.write(write, pickle.dumps(result))
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        status, value = pickle.loads(fh.read())
    os.waitpid(pid, 0)
    assert status == "ok", value
    return value


def test_an_unreadable_folder_is_counted_with_a_reason(tmp_path: Path) -> None:
    with world_readable_tmp() as base:
        d = data_dir(base / "d")
        d.chmod(0o755)
        write_npy(d / "locked" / "cremad_1002_TSI_SAD_XX.npy", frames(2, 8))
        (d / "locked").chmod(0o000)
        ds = unprivileged(lambda: load_dataset(d, use_cache=False))
    assert [s.rel for s in ds.samples] == [GOOD]
    assert skipped(ds) == {"locked": (SkipReason.UNREADABLE_FOLDER, "Permission denied")}


ODD_NAMES = {
    "not UTF-8": os.fsdecode(b"cremad_1002_TSI_SAD_XX_\xff\xfe.npy"),
    "a newline": "cremad_1003_TSI_SAD_XX_\nsecond line.npy",
    "markup and escapes": "cremad_1004_TSI_SAD_XX_[red]\x1b[2J\\.npy",
    "spaces and a dash first": "sad/-x  y.npy",  # labelled by its folder
}


def test_any_posix_file_name_loads_caches_splits_and_prints(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "d")
    for i, name in enumerate(ODD_NAMES.values()):
        write_npy(d / name, frames(2, 8, value=float(i)))
    names = {GOOD, *ODD_NAMES.values()}
    first = load_dataset(d, cache_dir=tmp_path / "cache")
    assert first.cache == "miss" and {s.rel for s in first.samples} == names
    again = load_dataset(d, cache_dir=tmp_path / "cache")  # the cache index round-trips every name
    assert again.cache == "hit" and [s.rel for s in again.samples] == [s.rel for s in first.samples]
    for i in range(len(first)):
        np.testing.assert_array_equal(again.sequence(i), first.sequence(i))
    split = make_split(first, "random", 0.4, seed=0)
    save_split(split, first, tmp_path / "split.json")  # split.json too
    loaded, missing = load_split(tmp_path / "split.json", again)
    assert missing == [] and list(loaded.train) == list(split.train) and list(loaded.val) == list(split.val)

    from rich.console import Console

    from trainer.ml.checkdata import printable

    rep = report(first)
    rep["unrecognized_examples"] = list(ODD_NAMES.values())
    with open(os.devnull, "w", encoding="utf-8") as strict:  # strict UTF-8, like a terminal
        render(rep, Console(file=strict, width=200))
    assert printable(ODD_NAMES["not UTF-8"]).endswith("_\\xff\\xfe.npy")
    assert "\n" not in printable(ODD_NAMES["a newline"]) and "\x1b" not in printable(ODD_NAMES["markup and escapes"])


@pytest.mark.timeout(120)
def test_check_data_never_hangs_and_lists_every_reason(tmp_path: Path) -> None:
    d = data_dir(tmp_path / "d")
    os.mkfifo(d / "cremad_1002_TSI_SAD_XX.npy")
    os.mkfifo(d / "wav2vec_mean.npy")  # a statistics file that is a pipe
    (d / "dangling.npy").symlink_to(tmp_path / "gone")
    (d / "linked").symlink_to(tmp_path)
    write_npy(d / ODD_NAMES["not UTF-8"], frames(2, 8))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for extra in ([], ["--stats-dir", str(d)]):
        proc = subprocess.run([sys.executable, "-m", "trainer", "check-data", str(d), "--json", *extra],
                              capture_output=True, env=env, timeout=90)
        assert proc.returncode == 0, proc.stderr
        rep = json.loads(proc.stdout)
        assert {k: v["count"] for k, v in rep["skip_reasons"].items()} == {
            "special_file": 2, "dangling_link": 1, "linked_folder": 1}
        assert {k: v["description"] for k, v in rep["skip_reasons"].items()}["linked_folder"].startswith(
            "a symbolic link to a folder")
    table = subprocess.run([sys.executable, "-m", "trainer", "check-data", str(d)], capture_output=True, env=env,
                           timeout=90)
    assert table.returncode == 0, table.stderr
    for reason in ("special_file", "dangling_link", "linked_folder"):
        assert reason.encode() in table.stdout


def test_files_only_in_a_linked_folder_say_so(tmp_path: Path) -> None:
    from trainer.ml.dataset import require_samples
    from trainer.ml.errors import DataError

    write_npy(tmp_path / "real" / GOOD, frames(2, 8))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "features").symlink_to(tmp_path / "real")
    with pytest.raises(DataError, match=r"no .npz/.npy feature files found under .* \(left out: 1 linked_folder\)"):
        require_samples(load_dataset(tmp_path / "d", use_cache=False))
