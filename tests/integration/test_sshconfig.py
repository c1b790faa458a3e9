"""~/.ssh/config is honoured identically by the control connection (paramiko) and the bulk
transfers (OpenSSH): a Host alias, and ProxyJump through a second loopback sshd; strict
host-key checking on every hop; odd known_hosts files and paths."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Sshd, run_orch, write_config
from tests.servers import start_sshd
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jump(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A second sshd: the bastion. DEBUG1 logs each connection it forwards."""
    with start_sshd(tmp_path_factory.mktemp("jump-sshd"), log_level="DEBUG1") as server:
        yield server


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ssh-features")
    synth(root, n=40, dim=8, seed=6, min_frames=4, max_frames=6)
    return root


def user() -> str:
    return os.environ.get("USER") or "root"


def setup(tmp_path: Path, sshd: Sshd, jump: Sshd, features: Path, host: str, *,
          known: tuple[Sshd, ...] | None = None, extra_known: str = "") -> Path:
    # Paths with a space and a '%' (OpenSSH expands %-tokens in some options).
    odd = tmp_path / "my keys %h"
    odd.mkdir()
    known_hosts = odd / "known hosts"
    known_hosts.write_text(extra_known + "".join(s.known_hosts_line() for s in (known or (sshd, jump))))
    ssh_config = odd / "ssh config"
    ssh_config.write_text(f"""
Host gpu-alias
  HostName 127.0.0.1
  Port {sshd.port}
  User {user()}
  IdentityFile "{sshd.client_key}"

Host behind-bastion
  HostName 127.0.0.1
  Port {sshd.port}
  User {user()}
  IdentityFile "{sshd.client_key}"
  ProxyJump bastion

Host bastion
  HostName 127.0.0.1
  Port {jump.port}
  User {user()}
  IdentityFile "{jump.client_key}"
""")
    return write_config(
        tmp_path / "deploy.yaml", target="ssh",
        ssh={"host": host, "known_hosts": str(known_hosts), "config_file": str(ssh_config), "connect_timeout": 5},
        remote={"root": str(tmp_path / "remote"), "python": sys.executable},
        data={"remote_dir": "data", "local_dir": str(features)},
        train={"epochs": 1, "batch_size": 8, "hidden": 8, "attention": 4, "cache_dir": str(tmp_path / "cache")})


def forwarded(jump: Sshd) -> int:
    """How many connections the bastion has forwarded so far."""
    return (jump.dir / "sshd.log").read_text(errors="replace").count("server_request_direct_tcpip")


@pytest.mark.parametrize("host", ["gpu-alias", "behind-bastion"])
def test_control_and_bulk_paths_reach_the_same_machine(tmp_path: Path, sshd: Sshd, jump: Sshd, features: Path,
                                                     host: str) -> None:
    cfg = setup(tmp_path, sshd, jump, features, host)
    before = forwarded(jump)
    # --sync-data: the bulk path (tar over OpenSSH); the probe, launch: the control path (paramiko)
    proc = run_orch("deploy", "-c", cfg, "--sync-data", "--json", "--run-id", "r1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["data"]["method"] == "ssh" and out["data"]["files"] == 41
    assert (tmp_path / "remote" / "data").is_dir()
    assert run_orch("monitor", "r1", "-c", cfg, "--interval", "0.3").returncode == 0
    got = run_orch("download", "r1", "-c", cfg, "--dest", tmp_path / "artifacts", "--json")
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "artifacts" / "r1" / "checkpoints" / "best.weights.h5").stat().st_size > 0
    if host == "behind-bastion":
        # control connections and OpenSSH's bulk transfers all went through the bastion
        assert forwarded(jump) - before >= 4


def test_every_hop_is_checked_against_known_hosts(tmp_path: Path, sshd: Sshd, jump: Sshd, features: Path) -> None:
    cfg = setup(tmp_path, sshd, jump, features, "behind-bastion", known=(sshd,))  # the bastion is unknown
    proc = run_orch("runs", "-c", cfg)
    assert proc.returncode == 5 and "unknown host key" in proc.stderr and jump.host_fingerprint in proc.stderr
    assert not (tmp_path / "remote").exists()


def test_known_hosts_lines_paramiko_cannot_use_are_skipped_and_revoked_keys_refused(
        tmp_path: Path, sshd: Sshd, jump: Sshd, features: Path) -> None:
    kind, b64 = sshd.host_key_pub.split()[:2]
    odd_lines = ("@cert-authority *.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsab\n"
                 "somehost sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t\n"
                 "this line is garbage\n")
    cfg = setup(tmp_path, sshd, jump, features, "gpu-alias", extra_known=odd_lines)
    proc = run_orch("runs", "-c", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 3 line(s)" in proc.stderr
    revoked = tmp_path / "revoked"
    revoked.mkdir()
    cfg = setup(revoked, sshd, jump, features, "gpu-alias", extra_known=f"@revoked * {kind} {b64}\n")
    known_hosts = next(revoked.glob("*/known hosts"))
    before = known_hosts.read_text()
    for flags in ([], ["--trust-new-host"]):  # known as trusted too, or offered to be trusted: refused
        proc = run_orch("runs", "-c", cfg, *flags)
        assert proc.returncode == 5 and "@revoked" in proc.stderr and "accepting" not in proc.stderr
    assert known_hosts.read_text() == before  # never written as trusted


def test_a_failing_stdin_writer_closes_its_channel(tmp_path: Path, sshd: Sshd) -> None:
    """A command whose stdin writer raises must not leak its SSH channel: sshd allows 10
    sessions per connection, so 15 failed commands in a row, their errors kept, must leave
    the connection usable (the channel gets EOF, then is closed, whatever happened)."""
    from orchestrator.context import Context
    from orchestrator.provision import acquire
    from tests.servers import ssh_deploy_config

    def broken(fh) -> None:  # noqa: ANN001
        fh.write(b"some bytes")
        raise RuntimeError("the writer failed")

    import time

    with acquire(Context(ssh_deploy_config(sshd, tmp_path))) as m:
        remote = m.remote
        channels = remote.client.get_transport()._channels  # paramiko forgets a channel once both ends closed it
        kept = []  # the errors are kept (as a caller reporting them would): their frames hold the channels
        for _ in range(15):
            with pytest.raises(RuntimeError) as error:
                remote.run("cat > /dev/null", write=broken)
            kept.append(error)
            deadline = time.monotonic() + 10
            while len(channels.values()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not channels.values(), "the channel was left open"
        assert remote.run("echo still fine").stdout == "still fine\n"
