"""Data sync over the loopback sshd: only new or changed files travel, never a partial file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.machine import Machine
from orchestrator.provision import acquire
from orchestrator.sync import sync_data
from tests.integration.conftest import Sshd, run_orch
from tests.servers import ssh_deploy_config

pytestmark = pytest.mark.slow


def make_files(root: Path, n: int, size: int = 2048) -> list[Path]:
    paths = []
    for i in range(n):
        p = root / ("sub" if i % 3 == 0 else ".") / f"cremad_{1000 + i}_TIE_HAP_XX.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
        paths.append(p)
    (root / ".hidden-cache").mkdir(exist_ok=True)
    (root / ".hidden-cache" / "x").write_text("never sent")
    return paths


def same_tree(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, tuple[bytes, int]]:
        return {p.relative_to(root).as_posix(): (p.read_bytes(), int(p.stat().st_mtime))
                for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)}
    return listing(a) == listing(b)


@pytest.mark.parametrize("use_ssh_client", [True, False], ids=["openssh-client", "paramiko-channel"])
def test_only_new_or_changed_files_travel(tmp_path: Path, sshd: Sshd, use_ssh_client: bool) -> None:
    local = tmp_path / "local"
    files = make_files(local, 40)
    cfg = ssh_deploy_config(sshd, tmp_path, local_dir=str(local), remote_dir="data")
    dest = tmp_path / "remote" / "data"

    def sync(m: Machine) -> int:
        result = sync_data(m, use_ssh_client=use_ssh_client)
        assert result.method == ("ssh" if use_ssh_client else "channel")
        return result.files

    with acquire(Context(cfg)) as m:
        assert sync(m) == 40
        assert same_tree(local, dest) and not (dest / ".hidden-cache").exists()
        assert sync(m) == 0  # nothing changed: nothing sent
        files[5].write_bytes(os.urandom(3000))
        os.utime(files[7], (time.time() + 100, time.time() + 100))
        (local / "cremad_1999_TIE_SAD_XX.npy").write_bytes(b"new")
        assert sync(m) == 3
        assert same_tree(local, dest)


def test_an_interrupted_upload_leaves_no_partial_file(tmp_path: Path, sshd: Sshd) -> None:
    import tarfile

    local = tmp_path / "local"
    make_files(local, 10, size=200_000)
    cfg = ssh_deploy_config(sshd, tmp_path, local_dir=str(local), remote_dir="data")
    dest = tmp_path / "remote" / "data"

    class Cut(Exception):
        pass

    original = tarfile.TarFile.addfile
    calls = {"n": 0}

    def addfile(self, tarinfo, fileobj=None):  # the connection "drops" in the middle of file 4
        calls["n"] += 1
        if calls["n"] == 4:
            self.fileobj.write(fileobj.read(50_000))
            raise Cut()
        return original(self, tarinfo, fileobj)

    with acquire(Context(cfg)) as m:
        tarfile.TarFile.addfile = addfile
        try:
            with pytest.raises(Exception):  # noqa: B017 - any failure of the upload will do
                sync_data(m, use_ssh_client=False)
        finally:
            tarfile.TarFile.addfile = original
        visible = [p for p in dest.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(dest).parts)]
        assert visible == []  # nothing half-written under a final name
        assert sync_data(m).files == 10  # running it again finishes the job
        assert not list((tmp_path / "remote").glob(".data.orch-incoming-*"))  # and leaves no staging behind
    assert same_tree(local, dest)


def test_a_receiver_killed_mid_upload_over_openssh_leaves_no_partial_file(tmp_path: Path, sshd: Sshd) -> None:
    import signal
    import threading

    from orchestrator.errors import RemoteError
    from tests.servers import processes_with

    local = tmp_path / "local"
    make_files(local, 20, size=1_000_000)  # far more than the pipes and the channel hold
    cfg = ssh_deploy_config(sshd, tmp_path, local_dir=str(local), remote_dir="data")
    dest = tmp_path / "remote" / "data"
    failed: list[BaseException] = []
    with acquire(Context(cfg)) as m:
        def upload() -> None:
            try:
                sync_data(m)
            except BaseException as exc:  # noqa: BLE001 - checked below
                failed.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        deadline = time.monotonic() + 120
        while not (staging := [p for p in (tmp_path / "remote").glob(".data.orch-incoming-*") if any(p.iterdir())]):
            assert time.monotonic() < deadline, "the upload never began"
            time.sleep(0.01)
        tars = processes_with("tar", "-x", str(staging[0]))  # this test's, never another's
        assert tars
        for pid in tars:  # the stream stalls here: the kill lands in its middle for sure
            os.kill(pid, signal.SIGSTOP)
        for pid in [*processes_with("data-receive", str(staging[0])), *tars]:  # the machine's side is gone
            os.kill(pid, signal.SIGKILL)
        for pid in tars:
            os.kill(pid, signal.SIGCONT)
        thread.join()
        assert len(failed) == 1 and isinstance(failed[0], RemoteError) and "ended abruptly" in str(failed[0]), failed
        visible = [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else []
        assert visible == []  # nothing half-written under a final name
        assert sync_data(m).files == 20  # running it again finishes the job
    assert not list((tmp_path / "remote").glob(".data.orch-incoming-*"))  # and leaves no staging behind
    assert same_tree(local, dest)


def test_deploy_sync_data_reports_what_it_sent(tmp_path: Path, sshd: Sshd) -> None:
    from tests.integration.conftest import write_config
    from trainer.ml.synth import synth

    local = tmp_path / "features"
    synth(local, n=80, dim=8, seed=2, min_frames=4, max_frames=8)
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line())
    cfg = write_config(
        tmp_path / "deploy.yaml", target="ssh",
        ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(known)},
        remote={"root": str(tmp_path / "remote"), "python": os.sys.executable},
        data={"remote_dir": "data", "local_dir": "features"},
        train={"epochs": 1, "hidden": 16, "attention": 8, "cache_dir": str(tmp_path / "cache")})
    proc = run_orch("deploy", "-c", cfg, "--sync-data", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["data"]["files"] == 81 and out["data"]["method"] == "ssh"  # 80 + SYNTHETIC_DATA.txt
    assert same_tree(local, tmp_path / "remote" / "data")


FULL_TAR = ("#!/bin/sh\ncat >/dev/null\necho 'tar: ./a.npy: Cannot write: No space left on device' >&2\n"
            "echo 'tar: Exiting with failure status due to previous errors' >&2\nexit 2\n")


def test_a_full_disk_on_the_machine_is_one_line_and_moves_nothing(tmp_path: Path, sshd: Sshd) -> None:
    import subprocess
    import sys

    from orchestrator.errors import DiskFull
    from tests.servers import small_disk
    from trainer.contract import verbs
    from trainer.contract.wire import Moved

    # The machine's side, its GNU tar out of room: it says so in its answer, and keeps no staging.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tar").write_text(FULL_TAR)
    (tmp_path / "bin" / "tar").chmod(0o755)
    staging, dest = tmp_path / ".staging", tmp_path / "dest"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "trainer.machine", "f00d", "data-receive", str(staging), str(dest)],
                          input=verbs.DATA_GO + bytes(10240), capture_output=True, env=env, check=True)
    answer = json.loads(proc.stdout.decode().split("f00d answer ", 1)[1])
    moved = Moved.from_json(answer)
    assert moved.disk_full and moved.files == 0 and "No space left on device" in (moved.error or "")
    assert not staging.exists() and not dest.exists()
    # End to end where a small file system can be mounted: one line, exit code 14, nothing moved.
    local = tmp_path / "local"
    make_files(local, 20, size=100_000)
    with small_disk(tmp_path / "remote", 600) as mounted:
        if mounted:
            cfg = ssh_deploy_config(sshd, tmp_path, local_dir=str(local), remote_dir="data")
            with acquire(Context(cfg)) as m, pytest.raises(DiskFull, match="no space left on device on .* for the"):
                sync_data(m)
            assert [p.name for p in (tmp_path / "remote").iterdir() if p.name.startswith(".data")] == []
            assert not [p for p in (tmp_path / "remote" / "data").rglob("*") if p.is_file()]
