"""Where machines come from: ONE provider per target kind (local, ssh, ec2) owns a machine's
life: find it (or create it from ``ec2.launch``), make sure it runs (starting or creating it
only when the command may cost money), stop or terminate it, connect to it. Commands get a
machine from :func:`acquire`, which also keeps the money rule: an instance this command started
or created is stopped again when the command fails before it launched anything (`orch up`,
whose whole point is a running machine, gets it from :func:`bring_up`). Nothing else in orch
calls AWS (orchestrator/ec2.py is this module's boto3 layer).

SkyPilot's provision step, as an interface the next features plug into (docs/DESIGN.md):
creating an instance from ``ec2.launch`` is ``Ec2Provider.ensure_running`` finding none; a spot
recovery is a provider replacing a machine; a sweep holds several providers, one per machine.
"""

from __future__ import annotations

import contextlib
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from orchestrator import cost, ec2
from orchestrator.context import Context
from orchestrator.errors import AwsError, ConfigError, ConnectError, OrchError
from orchestrator.hostkeys import HostKey, fingerprint
from orchestrator.local import LocalRemote
from orchestrator.machine import Machine
from orchestrator.remote import Remote
from orchestrator.ssh import SshRemote
from orchestrator.sshconfig import SshTarget, resolve

if TYPE_CHECKING:
    from orchestrator.config import DeployConfig

# `orch down` and `orch status` have an answer without the machine (EC2 tells the instance's
# state): they wait for it at most ssh.connect_timeout, and never longer than this.
QUICK_REACH_S = 15.0
# A new instance answers SSH, and prints its host key fingerprints on its console, a minute or
# two after EC2 calls it running.
FRESH_WAIT_S = 300.0


def quick_reach(cfg: DeployConfig) -> float:
    """How long `orch down` and `orch status` wait for the machine, all steps together."""
    return min(QUICK_REACH_S, cfg.ssh.connect_timeout)


@dataclass(frozen=True)
class Endpoint:
    """A running machine, ready to connect to."""

    host: str | None  # None: this computer
    instance: ec2.Instance | None = None
    started: bool = False  # this command started (or created) it: stop it again if nothing is launched
    created: bool = False  # this command created it (from ec2.launch)
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
    managed: bool = False  # orch created it (ec2.launch)
    market: str = field(init=False)  # "spot" or "on-demand", said in words (`orch status --json`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "market", "spot" if self.spot else "on-demand")

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

    def start(self) -> Endpoint:
        """`orch up`: start the instance, or create it from ec2.launch, whatever
        ec2.start_if_stopped says, and wait until it runs."""
        raise self._no_instance()

    def stop(self) -> InstanceStatus:
        """Stop the instance and wait until it is stopped; its disk stays (`orch down`)."""
        raise self._no_instance()

    def terminate(self) -> InstanceStatus:
        """Terminate the instance and wait until it is gone, its disk with it (`orch down --terminate`)."""
        raise self._no_instance()

    def _no_instance(self) -> ConfigError:
        return ConfigError(f"this command needs target: ec2 (the config says {self.cfg.target})")

    @abstractmethod
    def connect(self, endpoint: Endpoint, within: float | None = None) -> Remote:
        """One connection to the machine, reused for every step of a command. ``within``: give
        up after this many seconds, every wait included (the commands that can answer without it)."""


class LocalProvider(Provider):
    kind = "local"

    def ensure_running(self, *, start: bool) -> Endpoint:
        return Endpoint(None)

    def connect(self, endpoint: Endpoint, within: float | None = None) -> Remote:
        return LocalRemote(self.cfg.base_dir)


class SshProvider(Provider):
    """Any machine orch reaches over SSH; its life is the user's own."""

    kind = "ssh"

    def ensure_running(self, *, start: bool) -> Endpoint:
        assert self.cfg.ssh.host is not None  # the config validator requires it for target ssh
        return Endpoint(self.cfg.ssh.host)

    def connect(self, endpoint: Endpoint, within: float | None = None) -> Remote:
        return self._connect(self._target(endpoint), endpoint, within)

    def _target(self, endpoint: Endpoint) -> SshTarget:
        assert endpoint.host is not None
        return resolve(self.cfg.ssh, endpoint.host, self.cfg.local_path)

    def _connect(self, target: SshTarget, endpoint: Endpoint, within: float | None) -> Remote:
        if within is not None:
            target = replace(target, connect_timeout=min(target.connect_timeout, max(1.0, within)))
        return SshRemote(target, trusted_fingerprints=endpoint.fingerprints,
                         trust_new_host=self.ctx.trust.accept_new, log=self.ctx.log)


class Ec2Provider(SshProvider):
    """An EC2 instance found by id or Name tag (or created from ec2.launch), started, stopped and
    terminated with boto3's waiters."""

    kind = "ec2"

    @cached_property
    def client(self) -> Any:
        return ec2.client(self.cfg.ec2)

    @cached_property
    def launcher(self) -> Any:
        """The client RunInstances goes through: without botocore's retries (ec2._NO_RETRIES)."""
        return ec2.client(self.cfg.ec2, retries=False)

    @cached_property
    def ssm(self) -> Any:
        return ec2.client(self.cfg.ec2, "ssm")

    def find(self) -> ec2.Instance:
        inst = ec2.find_instance(self.client, self.cfg.ec2)
        assert inst is not None  # not missing_ok: a missing instance is an AwsError
        return inst

    def status(self) -> InstanceStatus:
        return self._status(self.find())

    def _status(self, inst: ec2.Instance) -> InstanceStatus:
        price = cost.estimate(self.cfg.ec2, inst, spot_price=lambda: ec2.spot_price(self.client, inst))
        return InstanceStatus(inst.instance_id, inst.instance_type, inst.state, self.cfg.ssh.host or inst.address,
                              inst.spot, price, inst.managed)

    def ensure_running(self, *, start: bool) -> Endpoint:
        return self._bring_up(allow=start and self.cfg.ec2.start_if_stopped)

    def start(self) -> Endpoint:
        return self._bring_up(allow=True)

    def _bring_up(self, *, allow: bool) -> Endpoint:
        """The instance, running: started (or, with ec2.launch, created) when ``allow``. Whatever
        this started or created is stopped again if bringing it up fails."""
        was = ec2.find_instance(self.client, self.cfg.ec2, missing_ok=allow and self.cfg.ec2.launch is not None)
        created = was is None
        started = created or (allow and was is not None and was.state in ("stopped", "stopping"))
        instance_id = was.instance_id if was is not None else None
        try:
            if was is None:
                instance_id = ec2.create(self.client, self.ssm, self.cfg.ec2, log=self.ctx.log,
                                         launcher=self.launcher).instance_id
            inst = ec2.ensure_running(self.client, self.cfg.ec2, allow_start=allow, log=self.ctx.log)
            host = self.cfg.ssh.host or inst.address
            if host is None:
                raise AwsError(f"instance {inst.instance_id} has no public address; set ssh.host "
                               "(e.g. its private address behind a ProxyJump host in ssh.config_file)")
        except BaseException:  # a wait that timed out, Ctrl-C, no address: what this command started, it stops
            if started and instance_id is not None:
                self._stop_again(instance_id, created=created)
            raise
        return Endpoint(host, inst, started=started, created=created,
                        fingerprints=lambda: ec2.console_fingerprints(self.client, inst.instance_id))

    def _stop_again(self, instance_id: str, *, created: bool = False) -> None:
        # A created instance is stopped, not terminated: terminating cannot be undone, and its disk
        # (with whatever the command already put there: data, the env) costs cents a day and is
        # found again, by its name, by the next deploy; `orch down --terminate` removes it.
        if created and self.one_time_spot:
            self.ctx.log(f"terminating instance {instance_id}: it was created for this command, which failed, and a "
                         "one-time spot instance cannot be stopped")
        elif created:
            self.ctx.log(f"stopping instance {instance_id}: it was created for this command, which failed (stopped, "
                         "not terminated: the next `orch up` or deploy starts it again; `orch down --terminate` "
                         "deletes it and its disk)")
        else:
            self.ctx.log(f"stopping instance {instance_id} again: it was started for this command, which failed")
        try:
            self.park(instance_id, created=created)
        except OrchError as exc:
            self.ctx.log(f"could not stop instance {instance_id} ({exc}): it is still RUNNING and billed; `orch down` "
                         "(or `orch down --terminate`) ends it")

    @property
    def one_time_spot(self) -> bool:
        """ec2.launch creates one-time spot instances, which EC2 can terminate but never stop."""
        spot = self.cfg.ec2.launch.spot if self.cfg.ec2.launch is not None else None
        return spot is not None and spot.interruption == "terminate"

    def park(self, instance_id: str, *, created: bool) -> None:
        """Stop an instance nobody asked to keep running; one this command (or its run) created
        as a one-time spot instance is terminated instead, as it cannot be stopped."""
        inst = ec2.describe(self.client, instance_id)
        if created and inst.spot and self.one_time_spot:
            ec2.terminate(self.client, instance_id, log=self.ctx.log, cancel_request=False)
        else:
            self.stop()

    def stop(self) -> InstanceStatus:
        return self._status(ec2.stop(self.client, self.cfg.ec2, log=self.ctx.log))

    def terminate(self) -> InstanceStatus:
        return self._status(ec2.terminate(self.client, self.find().instance_id, log=self.ctx.log))

    def connect(self, endpoint: Endpoint, within: float | None = None) -> Remote:
        target = self._target(endpoint)
        if not target.jumps:  # behind a jump host, only the jump host can tell
            began = time.monotonic()
            wait = within if within is not None else FRESH_WAIT_S if endpoint.created else \
                max(60.0, 10 * self.cfg.ssh.connect_timeout)
            _wait_for_port(target.hop.hostname, target.hop.port, wait, self.ctx.log)
            if within is not None:
                within -= time.monotonic() - began
        if endpoint.created and endpoint.instance is not None and not self.ctx.trust.accept_new:
            # Asked before connecting: sshd drops a login that waits (LoginGraceTime) for the console.
            prints = ec2.console_fingerprints(self.client, endpoint.instance.instance_id, wait=FRESH_WAIT_S,
                                              log=self.ctx.log)
            endpoint = replace(endpoint, fingerprints=lambda: prints)
        return self._connect(target, endpoint, within)


PROVIDERS: dict[str, type[Provider]] = {p.kind: p for p in (LocalProvider, SshProvider, Ec2Provider)}


def provider(ctx: Context) -> Provider:
    """The provider of ``ctx``'s target."""
    return PROVIDERS[ctx.cfg.target](ctx)


@contextlib.contextmanager
def acquire(ctx: Context, *, start: bool = False, within: float | None = None) -> Iterator[Machine]:
    """The machine, running and connected, for the block. ``start``: a stopped instance may be
    started, a missing one created from ec2.launch (deploy, resume). If this command started or
    created it and the block fails before a trainer was launched (``Machine.launched``), it is
    stopped again: nobody asked for an idle, paid machine. ``within``: give up connecting after
    this many seconds (:func:`quick_reach`)."""
    p = provider(ctx)
    endpoint = p.ensure_running(start=start)
    machine: Machine | None = None
    try:
        with p.connect(endpoint, within) as remote:
            machine = Machine(ctx, remote, spot=_spot(endpoint))
            machine.instance, machine.created = endpoint.instance, endpoint.created
            yield machine
    except BaseException:
        if endpoint.started and not (machine is not None and machine.launched):
            assert isinstance(p, Ec2Provider) and endpoint.instance is not None
            p._stop_again(endpoint.instance.instance_id, created=endpoint.created)
        raise


@contextlib.contextmanager
def bring_up(ctx: Context) -> Iterator[tuple[Provider, Machine]]:
    """`orch up`: the instance started, or created from ec2.launch, whatever ec2.start_if_stopped
    says; waited for until it runs and answers SSH; connected. Once it runs it stays running
    whatever fails next (a failed connection included): a running machine is what `up` is for."""
    p = provider(ctx)
    endpoint = p.start()
    try:
        remote = p.connect(endpoint)
    except OrchError as exc:
        assert endpoint.instance is not None
        raise type(exc)(f"{exc} (instance {endpoint.instance.instance_id} is running: `orch down` stops it)") from exc
    with remote:
        yield p, Machine(ctx, remote, spot=_spot(endpoint))


def _spot(endpoint: Endpoint) -> bool:
    """Whether EC2 calls the machine a spot instance (then its launches set spot watching)."""
    return endpoint.instance is not None and endpoint.instance.spot


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
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConnectError(f"{host}:{port} does not accept SSH connections after {timeout:.0f} s "
                                   f"({exc or type(exc).__name__}); check the security group and that sshd "
                                   "runs") from exc
            if not said:
                log(f"waiting for SSH on {host}:{port}")
                said = True
            time.sleep(max(0.0, min(2.0, deadline - time.monotonic())))
