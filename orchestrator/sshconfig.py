"""Where and how to SSH, resolved ONCE from deploy.yaml's `ssh:` section and the OpenSSH
client config (``ssh.config_file``, default ~/.ssh/config): HostName, User, Port,
IdentityFile, ProxyJump and Host aliases. Both paths use the result: the control connection
(paramiko, :mod:`orchestrator.remote`) connects hop by hop, and bulk transfers run OpenSSH
with a config file written from it (:func:`openssh_config`), so the two can never reach
different places. Values set in deploy.yaml win over ssh_config's, as on ssh's command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError

DEFAULT_USER = "ubuntu"
DEFAULT_PORT = 22
# AES-GCM first: with the AES instructions of any recent x86 or ARM server it moves bulk data
# ~1.5x faster than OpenSSH's default chacha20 (bench/bench_download.py).
CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"


@dataclass(frozen=True)
class Hop:
    """One SSH connection: the final machine, or a jump host on the way."""

    name: str  # as the user wrote it (a Host alias, or an address)
    hostname: str  # where to connect
    port: int
    user: str
    key_files: tuple[str, ...]  # empty: ssh-agent and the default keys

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts (OpenSSH's and ours) names this host."""
        return self.hostname if self.port == DEFAULT_PORT else f"[{self.hostname}]:{self.port}"

    @property
    def label(self) -> str:
        return self.hostname if self.port == DEFAULT_PORT else f"{self.hostname}:{self.port}"


@dataclass(frozen=True)
class SshTarget:
    hop: Hop  # the training machine
    jumps: tuple[Hop, ...]  # ProxyJump hosts, the first one first
    known_hosts: Path
    connect_timeout: float


def resolve(ssh: Any, host: str, local_path: Callable[[str], Path]) -> SshTarget:
    """The target for ``host`` (deploy.yaml's ssh.host, or the instance's address): deploy.yaml's
    user/port/key_file where set, else ssh_config's, else the defaults; ProxyJump from ssh_config."""
    config = _read_config(local_path(ssh.config_file) if ssh.config_file else None)
    found = config.lookup(host)
    explicit_key = str(local_path(ssh.key_file)) if ssh.key_file else None
    if explicit_key is not None and not Path(explicit_key).is_file():
        raise ConfigError(f"ssh.key_file: {explicit_key} does not exist (or is not a file); give the path of "
                          "the private key (e.g. the .pem of the EC2 key pair)")
    hop = Hop(
        name=host,
        hostname=found.get("hostname", host),
        port=_port(ssh.port if ssh.port is not None else found.get("port", DEFAULT_PORT), host),
        user=ssh.user or found.get("user") or DEFAULT_USER,
        key_files=(explicit_key,) if explicit_key else _existing(found.get("identityfile", [])),
    )
    jumps = tuple(_jump(spec, config) for spec in _jump_specs(found.get("proxyjump")))
    known_hosts = local_path(ssh.known_hosts) if ssh.known_hosts else Path.home() / ".ssh" / "known_hosts"
    return SshTarget(hop, jumps, known_hosts, ssh.connect_timeout)


def _read_config(path: Path | None) -> Any:
    import paramiko

    if path is None or not path.exists():
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except (OSError, UnicodeDecodeError, paramiko.ssh_exception.ConfigParseError) as exc:
        raise ConfigError(f"ssh.config_file: {path}: cannot read it ({exc})") from exc


def _port(value: Any, host: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"ssh config for {host}: port {value!r} is not a port number")
    return port


def _existing(paths: list[str]) -> tuple[str, ...]:
    # OpenSSH skips IdentityFile entries that do not exist; so do we.
    return tuple(p for p in paths if Path(p).is_file())


def _jump_specs(value: str | None) -> list[str]:
    if not value or value.strip().lower() == "none":
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def _jump(spec: str, config: Any) -> Hop:
    """A ProxyJump entry ``[user@]host[:port]``, completed from its own ssh_config block."""
    user, _, rest = spec.rpartition("@")
    host, port = rest, None
    if rest.startswith("["):  # [ipv6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] or None
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    found = config.lookup(host)
    return Hop(name=host, hostname=found.get("hostname", host),
               port=_port(port or found.get("port", DEFAULT_PORT), host),
               user=user or found.get("user") or DEFAULT_USER, key_files=_existing(found.get("identityfile", [])))


def openssh_config(target: SshTarget) -> str:
    """An OpenSSH client config naming the target ``orch-target`` (jump hosts ``orch-jump-N``),
    with exactly the resolved settings and strict host-key checking on every hop."""
    blocks = []
    hops = (*target.jumps, target.hop)
    for i, hop in enumerate(hops):
        alias = "orch-target" if i == len(hops) - 1 else f"orch-jump-{i}"
        lines = [f"Host {alias}", f"  HostName {hop.hostname}", f"  Port {hop.port}", f"  User {_word(hop.user)}"]
        lines += [f"  IdentityFile {_path(k)}" for k in hop.key_files]
        if hop.key_files:
            lines.append("  IdentitiesOnly yes")
        lines += [f"  UserKnownHostsFile {_path(str(target.known_hosts))}", "  GlobalKnownHostsFile /dev/null",
                  "  StrictHostKeyChecking yes", "  BatchMode yes",
                  f"  ConnectTimeout {max(1, int(target.connect_timeout))}", "  ServerAliveInterval 15",
                  f"  Ciphers {CIPHERS}"]
        if i > 0:
            lines.append(f"  ProxyJump orch-jump-{i - 1}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _path(path: str) -> str:
    """A path as an ssh_config value: quoted (spaces), with % doubled (OpenSSH expands %-tokens)."""
    if '"' in path or "\n" in path:
        raise ConfigError(f"{path!r}: OpenSSH cannot use a path with a double quote or a newline in it")
    return '"' + path.replace("%", "%%") + '"'


def _word(value: str) -> str:
    if any(c.isspace() for c in value) or '"' in value:
        raise ConfigError(f"ssh user {value!r}: a user name cannot contain spaces or quotes")
    return value
