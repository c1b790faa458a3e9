"""SSH host keys: OpenSSH's fingerprints, the known_hosts file as orch reads it (``@revoked``
honoured, lines paramiko cannot use skipped with a warning), and the policy for a host that is
not known yet: accepted only when it matches the instance's console fingerprints or when the
user says so (``orch trust``, ``--trust-new-host``), and always shown. Never silently."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, HostKeyError


def fingerprint(key: Any) -> str:
    """OpenSSH's SHA256 fingerprint of a host key ("SHA256:base64-without-padding")."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class HostKey:
    """A host key as shown to the user, and whether orch has just added it to known_hosts."""

    host: str
    kind: str
    fingerprint: str
    known_hosts: Path
    added: bool


def load_known_hosts(client: Any, path: Path, log: Callable[[str], None]) -> set[bytes]:
    """Load the known_hosts lines paramiko can use into ``client``; skip (with a warning) those
    it cannot (@cert-authority, key types it does not know, garbage); return the keys marked
    @revoked, which are refused whatever else says."""
    from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

    revoked: set[bytes] = set()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return revoked
    except OSError as exc:
        raise ConfigError(f"ssh.known_hosts: cannot read {path} ({exc.strerror})") from exc
    host_keys = client.get_host_keys()
    known: list[Any] = []
    skipped = 0
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        marker = text.split(None, 1)[0] if text.startswith("@") else None
        try:
            entry = HostKeyEntry.from_line(text.split(None, 1)[1] if marker else text, lineno=number)
        except (InvalidHostKey, IndexError, ValueError):
            entry = None
        if marker == "@revoked" and entry is not None and entry.key is not None:
            revoked.add(entry.key.asbytes())
        elif marker is None and entry is not None and entry.key is not None:
            known.append(entry)
        else:
            skipped += 1
    for entry in known:  # after every line is read: a revoked key is known nowhere
        if entry.key.asbytes() not in revoked:
            for name in entry.hostnames:
                host_keys.add(name, entry.key.get_name(), entry.key)
    if skipped:
        log(f"{path}: skipped {skipped} line(s) orch cannot use (@cert-authority, unknown key types)")
    return revoked


class VerifyNewHostKey:
    """paramiko policy for a host not in known_hosts: accept only what the user trusts, and
    say which key it is."""

    def __init__(self, known_hosts: Path, trusted: Callable[[], Iterable[str]], trust_new_host: bool,
                 log: Callable[[str], None], revoked: set[bytes]) -> None:
        self.known_hosts, self.trusted, self.trust_new_host, self.log = known_hosts, trusted, trust_new_host, log
        self.revoked = revoked
        self.accepted: list[HostKey] = []

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        fp = fingerprint(key)
        if key.asbytes() in self.revoked:
            raise HostKeyError(f"the host key of {hostname} ({key.get_name()} {fp}) is marked @revoked in "
                               f"{self.known_hosts}: refusing to connect")
        # Only an unknown host costs the look-up (for EC2: the instance's console output).
        trusted = set() if self.trust_new_host else set(self.trusted())
        if not (self.trust_new_host or fp in trusted):
            source = ("it matches none of the fingerprints in the instance's console output"
                      if trusted else "there is nothing to check it against")
            raise HostKeyError(
                f"unknown host key for {hostname}: {key.get_name()} {fp} ({source}); if you trust it, "
                "run `orch trust` or pass --trust-new-host"
            )
        how = "as you asked (--trust-new-host / orch trust)" if self.trust_new_host else \
            "it matches the instance's console output"
        self.log(f"accepting the host key of {hostname}: {key.get_name()} {fp}, {how}; saved in {self.known_hosts}")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        self.known_hosts.chmod(0o600)
        self.accepted.append(HostKey(hostname, key.get_name(), fp, self.known_hosts, True))
