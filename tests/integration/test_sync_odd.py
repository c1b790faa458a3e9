"""Data sync of odd entries and odd names, over the loopback sshd, on both transfer paths:
only file contents travel (never links), what cannot be sent is skipped and counted, and
any valid POSIX file name syncs, again and again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.context import Context
from orchestrator.provision import acquire
from orchestrator.sync import DataSync, sync_data
from tests.integration.conftest import Sshd, write_config
from tests.integration.trainer_proc import trainer_env
from tests.servers import ssh_deploy_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
METHODS = pytest.mark.parametrize("use_ssh_client", [True, False], ids=["openssh-client", "paramiko-channel"])


def remote_tree(dest: Path) -> dict[bytes, bytes]:
    """Every visible file on the machine, by its name's bytes; links would show as such."""
    out = {}
    top = os.fsencode(dest)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not d.startswith(b".")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            assert not os.path.islink(path), f"a link was sent: {path!r}"
            with open(path, "rb") as fh:
                out[os.path.relpath(path, top)] = fh.read()
    return out


def sync(tmp_path: Path, sshd: Sshd, use_ssh_client: bool) -> tuple[DataSync, list[str]]:
    cfg = ssh_deploy_config(sshd, tmp_path, local_dir=str(tmp_path / "local"), remote_dir="data")
    logs: list[str] = []
    with acquire(Context(cfg)) as m:
        m.log = logs.append
        result = sync_data(m, use_ssh_client=use_ssh_client)
    assert result.method == ("ssh" if use_ssh_client else "channel")
    return result, logs


@contextlib.contextmanager
def bound_socket(path: Path) -> Iterator[None]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield


@METHODS
def test_links_are_sent_as_their_files_and_what_cannot_be_sent_is_counted(tmp_path: Path, sshd: Sshd,
                                                                          use_ssh_client: bool) -> None:
    local, elsewhere = tmp_path / "local", tmp_path / "elsewhere"
    (local / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (local / "a.npy").write_bytes(b"a" * 100)
    (elsewhere / "real.npy").write_bytes(b"real content")
    (elsewhere / "inside.npy").write_bytes(b"x")
    (local / "sub" / "link.npy").symlink_to(elsewhere / "real.npy")  # sent: the file it leads to
    (local / "dangling.npy").symlink_to(tmp_path / "gone.npy")
    (local / "loop1.npy").symlink_to(local / "loop2.npy")
    (local / "loop2.npy").symlink_to(local / "loop1.npy")
    os.mkfifo(local / "pipe.npy")  # reading it would wait forever
    (local / "zero.npy").symlink_to("/dev/zero")  # reading it would never end
    (local / "folder").symlink_to(elsewhere)  # not followed, as the trainer does not
    with bound_socket(local / "sock.npy"):
        first, logs = sync(tmp_path, sshd, use_ssh_client)
    assert remote_tree(tmp_path / "remote" / "data") == {b"a.npy": b"a" * 100, b"sub/link.npy": b"real content"}
    assert first.files == 2 and first.skipped == 7
    assert any("7 entries not sent" in m and "3 links to nothing or looping" in m for m in logs), logs
    again, _ = sync(tmp_path, sshd, use_ssh_client)
    assert again.files == 0  # a link's file has the same size and mtime on both sides now


ODD = [
    b"not-utf8-\xff\xfe.npy",
    b"new\nline.npy",
    b"-rf.npy",  # never read as an option of tar
    b"--null.npy",
    b"spaces  and\ttab.npy",
    b"back\\slash \"quotes' $(id) `id`.npy",
    "unicode-é-日本.npy".encode(),
    b"sub dir/\xe9-latin1.npy",
    b"long-" + b"x" * 200 + b".npy",  # beyond a plain tar header's 100 bytes
]


@METHODS
def test_any_posix_name_syncs_and_later_syncs_keep_working(tmp_path: Path, sshd: Sshd,
                                                          use_ssh_client: bool) -> None:
    local = os.fsencode(tmp_path / "local")
    os.makedirs(os.path.join(local, b"sub dir"))
    for i, name in enumerate(ODD):
        with open(os.path.join(local, name), "wb") as fh:
            fh.write(b"%d" % i * 50)
    first, _ = sync(tmp_path, sshd, use_ssh_client)
    expected = {name: b"%d" % i * 50 for i, name in enumerate(ODD)}
    assert first.files == len(ODD) and remote_tree(tmp_path / "remote" / "data") == expected
    assert sync(tmp_path, sshd, use_ssh_client)[0].files == 0  # the listing reads every name back
    with open(os.path.join(local, ODD[1]), "wb") as fh:
        fh.write(b"changed")
    assert sync(tmp_path, sshd, use_ssh_client)[0].files == 1
    assert remote_tree(tmp_path / "remote" / "data")[ODD[1]] == b"changed"


SCRIPT = """
import json, sys
from orchestrator.config import load_config
from orchestrator.sync import sync_data
from orchestrator.context import Context
from orchestrator.provision import acquire
with acquire(Context(load_config(sys.argv[1]))) as m:
    m.log = lambda message: print(message, file=sys.stderr)
    result = sync_data(m, use_ssh_client=sys.argv[2] == "1")
print(json.dumps({"files": result.files, "skipped": result.skipped}))
"""


def unprivileged_argv() -> list[str]:
    """A prefix that takes root's power to read anything (we run as root here), or nothing."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: nothing is unreadable to us")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


@METHODS
def test_unreadable_files_and_folders_are_skipped(tmp_path: Path, sshd: Sshd, use_ssh_client: bool) -> None:
    local = tmp_path / "local"
    (local / "locked").mkdir(parents=True)
    (local / "ok.npy").write_bytes(b"ok")
    (local / "locked" / "inside.npy").write_bytes(b"x")
    (local / "secret.npy").write_bytes(b"secret")
    (local / "secret.npy").chmod(0)
    (local / "locked").chmod(0)
    (tmp_path / "known_hosts").write_text(sshd.known_hosts_line())
    cfg = write_config(tmp_path / "deploy.yaml", target="ssh",
                       ssh={"host": "127.0.0.1", "port": sshd.port, "user": os.environ.get("USER") or "root",
                            "key_file": str(sshd.client_key), "known_hosts": str(tmp_path / "known_hosts")},
                       remote={"root": str(tmp_path / "remote"), "python": sys.executable},
                       data={"remote_dir": "data", "local_dir": str(local)})
    try:
        proc = subprocess.run([*unprivileged_argv(), sys.executable, "-c", SCRIPT, str(cfg),
                               "1" if use_ssh_client else "0"], capture_output=True, text=True, env=trainer_env(),
                              timeout=120)
    finally:
        (local / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"files": 1, "skipped": 2}
    assert "1 unreadable files" in proc.stderr and "1 unreadable folders" in proc.stderr
    assert remote_tree(tmp_path / "remote" / "data") == {b"ok.npy": b"ok"}
