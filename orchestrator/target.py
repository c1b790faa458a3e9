"""Provision: from deploy.yaml to an open connection to the training machine."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from orchestrator import ec2
from orchestrator.config import DeployConfig
from orchestrator.errors import AwsError, ConnectError
from orchestrator.remote import HostKey, LocalRemote, Remote, SshRemote, fingerprint
from orchestrator.sshconfig import resolve

Log = Callable[[str], None]


def open_remote(cfg: DeployConfig, *, trust_new_host: bool = False, log: Log = lambda _m: None,
                start: bool = False) -> Remote:
    """Resolve the machine and connect to it once. A stopped EC2 instance is started only
    with ``start`` (deploy, resume, up: the commands that may cost money); every other
    command gets InstanceStopped and leaves it stopped."""
    if cfg.target == "local":
        return LocalRemote(cfg.base_dir)
    host = cfg.ssh.host
    fingerprints: Callable[[], set[str]] = set
    if cfg.target == "ec2":
        client = ec2.client(cfg.ec2)
        inst = ec2.ensure_running(client, cfg.ec2, allow_start=start and cfg.ec2.start_if_stopped, log=log)
        host = cfg.ssh.host or inst.address
        if host is None:
            raise AwsError(f"instance {inst.instance_id} has no public address; set ssh.host "
                           "(e.g. its private address behind a ProxyJump host in ssh.config_file)")
        fingerprints = lambda: ec2.console_fingerprints(client, inst.instance_id)  # noqa: E731
    assert host is not None  # the config validator requires ssh.host for target ssh
    target = resolve(cfg.ssh, host, cfg.local_path)
    if cfg.target == "ec2" and not target.jumps:  # behind a jump host, only the jump host can tell
        _wait_for_port(target.hop.hostname, target.hop.port, max(60.0, 10 * cfg.ssh.connect_timeout), log)
    return SshRemote(target, trusted_fingerprints=fingerprints, trust_new_host=trust_new_host, log=log)


def trust_host(cfg: DeployConfig, *, log: Log = lambda _m: None) -> HostKey:
    """Connect once, accepting (and showing) an unknown host key: ``orch trust``."""
    with open_remote(cfg, trust_new_host=True, log=log) as remote:
        if not isinstance(remote, SshRemote):
            raise ConnectError("target local has no SSH host key to trust")
        key = remote.server_key
        added = any(a.fingerprint == fingerprint(key) for a in remote.accepted)
        return HostKey(remote.host, key.get_name(), fingerprint(key), remote.target.known_hosts, added)


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
