"""What `orch download` may write (orchestrator/confine.py), its temp files, and its children."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import children
from orchestrator.confine import CorruptRun, checked_entries, path_problem
from orchestrator.destination import check_dest, remove_stale_parts
from orchestrator.errors import ConfigError
from trainer.contract import layout
from trainer.contract.wire import RunFiles

H = "a" * 64


@pytest.mark.parametrize("rel, problem", [
    ("stats/classes.json", None),
    ("checkpoints/best.weights.h5", None),
    ("stats/training_curves.png", None),
    ("odd name with spaces", "character"),
    ("é", "character"),
    ("[/markup]", "character"),
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("../x", "'..'"),
    ("stats/../../x", "'..'"),
    ("stats//x", "empty"),
    ("./x", "'.'"),
    ("stats/", "empty"),
    ("a\nb", "character"),
    ("a\x1b[2Jb", "character"),
    ("bad\udcffname", "character"),
    ("x" * 236, "235"),
    ("stats/.x.part-12", "temp files"),
])
def test_path_problem(rel: str, problem: str | None) -> None:
    got = path_problem(rel)
    assert (got is None) if problem is None else (problem in got)


def files(manifest: str, *rels: str) -> RunFiles:
    return RunFiles(manifest, {rel: 10 for rel in rels})


def test_checked_entries_places_every_file_inside_the_target(tmp_path: Path) -> None:
    text = f"{H}  run.json\n{H}  stats/classes.json\n"
    entries = checked_entries("r1", files(text, "run.json", "stats/classes.json"), tmp_path / "r1")
    assert [(e.rel, e.local) for e in entries] == [("run.json", tmp_path / "r1" / "run.json"),
                                                   ("stats/classes.json", tmp_path / "r1" / "stats/classes.json")]


@pytest.mark.parametrize("manifest, listed, says", [
    (f"{H}  /etc/passwd\n", ["/etc/passwd"], "an absolute path"),
    (f"{H}  ../../x\n", ["../../x"], "'..'"),
    (f"{H}  stats\n", [], "not a regular file"),
    (f"{H}  a\n{H}  a/b\n", ["a", "a/b"], "lists both 'a' and 'a/b'"),
    (f"{H}  a\n{'b' * 64}  a\n", ["a"], "twice"),
    (f"{'g' * 64}  a\n", ["a"], "malformed checksum"),
    ("garbage\n", [], "malformed line"),
    (f"{H}  a\n" * 1001, ["a"], "1001 files"),
])
def test_checked_entries_refuses_a_crafted_manifest(tmp_path: Path, manifest: str, listed: list[str],
                                                   says: str) -> None:
    with pytest.raises(CorruptRun, match="run r1 looks corrupt") as err:
        checked_entries("r1", files(manifest, *listed), tmp_path / "r1")
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "r1").exists()


def test_a_local_link_out_of_the_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "r1" / "stats").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CorruptRun, match="would be written outside"):
        checked_entries("r1", files(f"{H}  stats/x\n", "stats/x"), tmp_path / "r1")
    # the run folder itself may be a link the user made (DEST on another disk)
    (tmp_path / "r2").symlink_to(tmp_path / "elsewhere")
    assert checked_entries("r2", files(f"{H}  x\n", "x"), tmp_path / "r2")[0].local == tmp_path / "elsewhere" / "x"


def test_a_local_folder_where_a_file_goes_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "r1" / "run.json").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is a folder"):
        checked_entries("r1", files(f"{H}  run.json\n", "run.json"), tmp_path / "r1")


def test_too_big_or_missing(tmp_path: Path) -> None:
    with pytest.raises(CorruptRun, match="more files"):
        checked_entries("r1", RunFiles(None, {}, too_big=True), tmp_path)
    with pytest.raises(Exception, match=f"no {layout.MANIFEST} yet"):
        checked_entries("r1", RunFiles(None, {}), tmp_path)


def test_check_dest(tmp_path: Path) -> None:
    check_dest(tmp_path / "new" / "deeper")
    (tmp_path / "file").write_text("x")
    for dest in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ConfigError, match="is not a folder"):
            check_dest(dest)


def test_stale_parts_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "stats").mkdir(parents=True)
    stale = tmp_path / "stats" / f".classes.json.part-{dead.pid}"
    live = tmp_path / f".best.weights.h5.part-{os.getppid()}"  # another download, still running
    mine = tmp_path / f".run.json.part-{os.getpid()}"  # left by an earlier process with our pid
    keep = tmp_path / "notes.part-1"
    for p in (stale, live, mine, keep):
        p.write_text("x")
    remove_stale_parts(tmp_path)
    assert not stale.exists() and not mine.exists() and live.exists() and keep.exists()


def test_a_scope_kills_the_children_it_spawned() -> None:
    with pytest.raises(KeyboardInterrupt), children.scope():
        proc = children.spawn(["sleep", "30"])
        raise KeyboardInterrupt
    assert proc.returncode is not None  # killed and reaped at once


def test_a_child_dies_with_orch(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from orchestrator import children; "
        "p = children.spawn(['sleep', '30']); open(sys.argv[2], 'w').write(str(p.pid)); time.sleep(30)"),
        str(Path(__file__).parents[2]), str(pid_file)])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # gone
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError("the child outlived its parent")


def test_the_machine_lists_regular_files_reached_without_a_link(tmp_path: Path) -> None:
    from trainer.machine.probe import run_files

    run = tmp_path / "run"
    (run / "stats").mkdir(parents=True)
    (run / "stats" / "classes.json").write_text("[]")
    (run / layout.MANIFEST).write_text(f"{H}  stats/classes.json\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("k")
    (run / "linked").symlink_to(tmp_path / "secret")
    (run / "key").symlink_to(tmp_path / "secret" / "key")
    os.mkfifo(run / "pipe")
    got = run_files(run)
    assert got.files == {"stats/classes.json": 2, layout.MANIFEST: 85} and got.manifest.startswith(H)
    assert run_files(tmp_path / "missing") == RunFiles()
    (tmp_path / "linked-run").symlink_to(run)
    assert run_files(tmp_path / "linked-run") == RunFiles()  # a run folder that is a link is no run


def test_an_odd_answer_from_the_machine_is_input_too() -> None:
    got = RunFiles.from_json({"files": {"a": "x", "b": 3, "c": True, "d": -1}, "manifest": 5, "too_big": 0})
    assert got == RunFiles(None, {"b": 3}, False)
    assert RunFiles.from_json({"files": [1, 2]}) == RunFiles()


def test_a_local_link_loop_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "stats").symlink_to(tmp_path / "r1" / "stats")
    with pytest.raises(ConfigError, match="cannot resolve"):
        checked_entries("r1", files(f"{H}  stats/x\n", "stats/x"), tmp_path / "r1")
