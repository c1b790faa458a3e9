"""Provision: from deploy.yaml to an open connection to the training machine."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator import ec2
from orchestrator.config import DeployConfig
from orchestrator.errors import AwsError, ConnectError
from orchestrator.remote import LocalRemote, Remote, SshRemote, SshTarget

Log = Callable[[str], None]


def open_remote(cfg: DeployConfig, *, trust_new_host: bool = False, log: Log = lambda _m: None) -> Remote:
    """Resolve the machine (starting an EC2 instance if needed) and connect to it once."""
    if cfg.target == "local":
        return LocalRemote(cfg.base_dir)
    host = cfg.ssh.host
    fingerprints: Callable[[], set[str]] = set
    if cfg.target == "ec2":
        client = ec2.client(cfg.ec2)
        inst = ec2.ensure_running(client, cfg.ec2, cfg.ec2.start_if_stopped, log)
        host = cfg.ssh.host or inst.address
        if host is None:
            raise AwsError(f"instance {inst.instance_id} has no public address; set ssh.host "
                           "(e.g. its private address over a VPN)")
        fingerprints = lambda: ec2.console_fingerprints(client, inst.instance_id)  # noqa: E731
        _wait_for_port(host, cfg.ssh.port, max(60.0, 10 * cfg.ssh.connect_timeout), log)
    assert host is not None  # the config validator requires ssh.host for target ssh
    target = SshTarget(
        host=host, port=cfg.ssh.port, user=cfg.ssh.user,
        key_file=str(cfg.local_path(cfg.ssh.key_file)) if cfg.ssh.key_file else None,
        known_hosts=cfg.local_path(cfg.ssh.known_hosts) if cfg.ssh.known_hosts
        else Path.home() / ".ssh" / "known_hosts",
        connect_timeout=cfg.ssh.connect_timeout,
    )
    return SshRemote(target, trusted_fingerprints=fingerprints, trust_new_host=trust_new_host)


def _wait_for_port(host: str, port: int, timeout: float, log: Log) -> None:
    """A freshly started instance answers SSH some seconds after EC2 calls it running."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectError(f"{host}:{port} does not accept SSH connections after {timeout:.0f} s "
                                   f"({exc}); check the security group") from exc
            if not said:
                log(f"waiting for SSH on {host}:{port}")
                said = True
            time.sleep(2)
