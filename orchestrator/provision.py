"""Where machines come from: ONE provider per target kind (local, ssh, ec2) owns a machine's
life: find it, make sure it runs (starting it only when the command may cost money), stop it,
connect to it. Commands get a machine from :func:`acquire`, which also keeps the money rule:
an instance this command started is stopped again when the command fails before it launched
anything. Nothing else in orch calls EC2 (orchestrator/ec2.py is this module's boto3 layer).

SkyPilot's provision step, as an interface the next features plug into (docs/DESIGN.md):
creating an instance from ``ec2.launch`` is ``Provider.ensure_running`` finding none; a spot
recovery is a provider replacing a machine; a sweep holds several providers, one per machine.
"""

from __future__ import annotations

import contextlib
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from orchestrator import cost, ec2
from orchestrator.context import Context
from orchestrator.errors import AwsError, ConfigError, ConnectError, OrchError
from orchestrator.hostkeys import HostKey, fingerprint
from orchestrator.local import LocalRemote
from orchestrator.machine import Machine
from orchestrator.remote import Remote
from orchestrator.ssh import SshRemote
from orchestrator.sshconfig import resolve


@dataclass(frozen=True)
class Endpoint:
    """A running machine, ready to connect to."""

    host: str | None  # None: this computer
    instance: ec2.Instance | None = None
    started: bool = False  # this command started it: stop it again if nothing is launched
    # The host-key fingerprints the machine itself published (an EC2 instance's console output):
    # an unknown key that matches one of them is trusted. Read only when a key is unknown.
    fingerprints: Callable[[], set[str]] = field(default=set)


@dataclass(frozen=True)
class InstanceStatus:
    """An instance as EC2 describes it, with what it costs."""

    id: str
    type: str | None
    state: str
    address: str | None
    spot: bool
    cost: cost.Cost

    @property
    def running(self) -> bool:
        return self.state == "running"


class Provider(ABC):
    """A machine's life for one target kind."""

    kind: str = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.cfg = ctx, ctx.cfg

    def status(self) -> InstanceStatus | None:
        """The instance, as its cloud describes it (None: there is no instance to describe)."""
        return None

    @abstractmethod
    def ensure_running(self, *, start: bool) -> Endpoint:
        """The machine, running. ``start``: a stopped instance may be started (deploy, resume,
        up: the commands that may cost money); otherwise a stopped one is InstanceStopped."""

    def start(self) -> InstanceStatus:
        """Start the instance and wait until it runs (`orch up`)."""
        raise self._no_instance()

    def stop(self) -> InstanceStatus:
        """Stop the instance and wait until it is stopped; its disk stays (`orch down`)."""
        raise self._no_instance()

    def _no_instance(self) -> ConfigError:
        return ConfigError(f"this command needs target: ec2 (the config says {self.cfg.target})")

    @abstractmethod
    def connect(self, endpoint: Endpoint) -> Remote:
        """One connection to the machine, reused for every step of a command."""


class LocalProvider(Provider):
    kind = "local"

    def ensure_running(self, *, start: bool) -> Endpoint:
        return Endpoint(None)

    def connect(self, endpoint: Endpoint) -> Remote:
        return LocalRemote(self.cfg.base_dir)


class SshProvider(Provider):
    """Any machine orch reaches over SSH; its life is the user's own."""

    kind = "ssh"

    def ensure_running(self, *, start: bool) -> Endpoint:
        assert self.cfg.ssh.host is not None  # the config validator requires it for target ssh
        return Endpoint(self.cfg.ssh.host)

    def connect(self, endpoint: Endpoint) -> Remote:
        assert endpoint.host is not None
        target = resolve(self.cfg.ssh, endpoint.host, self.cfg.local_path)
        return SshRemote(target, trusted_fingerprints=endpoint.fingerprints,
                         trust_new_host=self.ctx.trust.accept_new, log=self.ctx.log)


class Ec2Provider(SshProvider):
    """An EC2 instance found by id or Name tag, started and stopped with boto3's waiters."""

    kind = "ec2"

    @cached_property
    def client(self) -> Any:
        return ec2.client(self.cfg.ec2)

    def find(self) -> ec2.Instance:
        return ec2.find_instance(self.client, self.cfg.ec2)

    def status(self) -> InstanceStatus:
        inst = self.find()
        price = cost.estimate(self.cfg.ec2, inst, spot_price=lambda: ec2.spot_price(self.client, inst))
        return InstanceStatus(inst.instance_id, inst.instance_type, inst.state, self.cfg.ssh.host or inst.address,
                              inst.spot, price)

    def ensure_running(self, *, start: bool) -> Endpoint:
        was = self.find()
        started = was.state in ("stopped", "stopping") and start and self.cfg.ec2.start_if_stopped
        try:
            inst = ec2.ensure_running(self.client, self.cfg.ec2, allow_start=start and self.cfg.ec2.start_if_stopped,
                                      log=self.ctx.log)
            host = self.cfg.ssh.host or inst.address
            if host is None:
                raise AwsError(f"instance {inst.instance_id} has no public address; set ssh.host "
                               "(e.g. its private address behind a ProxyJump host in ssh.config_file)")
        except BaseException:  # a wait that timed out, Ctrl-C, no address: what this command started, it stops
            if started:
                self._stop_again(was.instance_id)
            raise
        return Endpoint(host, inst, started=started,
                        fingerprints=lambda: ec2.console_fingerprints(self.client, inst.instance_id))

    def _stop_again(self, instance_id: str) -> None:
        self.ctx.log(f"stopping instance {instance_id} again: it was started for this command, which failed")
        with contextlib.suppress(OrchError):
            self.stop()

    def start(self) -> InstanceStatus:
        ec2.ensure_running(self.client, self.cfg.ec2, allow_start=True, log=self.ctx.log)
        return self.status()

    def stop(self) -> InstanceStatus:
        ec2.stop(self.client, self.cfg.ec2, log=self.ctx.log)
        return self.status()

    def connect(self, endpoint: Endpoint) -> Remote:
        assert endpoint.host is not None
        target = resolve(self.cfg.ssh, endpoint.host, self.cfg.local_path)
        if not target.jumps:  # behind a jump host, only the jump host can tell
            _wait_for_port(target.hop.hostname, target.hop.port, max(60.0, 10 * self.cfg.ssh.connect_timeout),
                           self.ctx.log)
        return super().connect(endpoint)


PROVIDERS: dict[str, type[Provider]] = {p.kind: p for p in (LocalProvider, SshProvider, Ec2Provider)}


def provider(ctx: Context) -> Provider:
    """The provider of ``ctx``'s target."""
    return PROVIDERS[ctx.cfg.target](ctx)


@contextlib.contextmanager
def acquire(ctx: Context, *, start: bool = False) -> Iterator[Machine]:
    """The machine, running and connected, for the block. ``start``: a stopped instance may be
    started (deploy, resume, up). If this command started it and the block fails before a trainer
    was launched (``Machine.launched``), it is stopped again: nobody asked for an idle, paid machine."""
    p = provider(ctx)
    endpoint = p.ensure_running(start=start)
    machine: Machine | None = None
    try:
        with p.connect(endpoint) as remote:
            machine = Machine(ctx, remote)
            yield machine
    except BaseException:
        if endpoint.started and not (machine is not None and machine.launched):
            assert isinstance(p, Ec2Provider) and endpoint.instance is not None
            p._stop_again(endpoint.instance.instance_id)
        raise


def trust_host(ctx: Context) -> HostKey:
    """Connect once, accepting (and showing) an unknown host key: ``orch trust``."""
    with acquire(ctx.trusting_new_hosts()) as m:
        remote = m.remote
        if not isinstance(remote, SshRemote):
            raise ConfigError("target local has no SSH host key to trust")
        key = remote.server_key
        added = any(a.fingerprint == fingerprint(key) for a in remote.accepted)
        return HostKey(remote.host, key.get_name(), fingerprint(key), remote.target.known_hosts, added)


def _wait_for_port(host: str, port: int, timeout: float, log: Callable[[str], None]) -> None:
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
