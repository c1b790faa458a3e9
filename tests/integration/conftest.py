"""Real servers on 127.0.0.1: an OpenSSH sshd with throw-away keys, and moto's EC2 server.

Every test here runs with HOME pointing at a temporary folder and no AWS variables of the
user's, so nothing can touch the real ~/.ssh or ~/.aws.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.servers import Sshd, free_port, keygen, start_sshd

__all__ = ["Sshd", "keygen", "run_orch", "write_config"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
    return home


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for moto (never real ones)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def write_config(path: Path, **sections: object) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_orch(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`orch ...` as a real process (so a deploy's SSH session really ends with it)."""
    from tests.integration.trainer_proc import trainer_env

    return subprocess.run([sys.executable, "-m", "orchestrator", *map(str, args)], capture_output=True, text=True,
                          env=trainer_env(), cwd=cwd, timeout=timeout)
