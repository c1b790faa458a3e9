"""`orch status` and `orch down`: the machine as it is (instance, cost, GPUs, runs,
autostop), and stopping it without surprises. Neither ever starts a stopped instance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator import cost, ec2
from orchestrator.config import DeployConfig
from orchestrator.errors import BusyError, ConfigError
from orchestrator.machine import connect
from trainer.wire import Machine

Log = Callable[[str], None]


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    type: str | None
    state: str
    address: str | None
    spot: bool
    cost: cost.Cost


@dataclass(frozen=True)
class MachineStatus:
    target: str
    instance: InstanceInfo | None
    host: str | None  # None: the instance is not running, nothing was asked of it
    machine: Machine | None

    @property
    def stopped(self) -> bool:
        return self.instance is not None and self.instance.state != "running"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def require_ec2(cfg: DeployConfig) -> None:
    if cfg.target != "ec2":
        raise ConfigError(f"this command needs target: ec2 (the config says {cfg.target})")


def machine_status(cfg: DeployConfig, *, trust_new_host: bool = False, log: Log = lambda _m: None) -> MachineStatus:
    """The instance (type, state, price, uptime, cost so far), then, if it runs, ONE question
    to the machine: GPUs, load, runs, autostop."""
    info = None
    if cfg.target == "ec2":
        client = ec2.client(cfg.ec2)
        inst = ec2.find_instance(client, cfg.ec2)
        info = InstanceInfo(inst.instance_id, inst.instance_type, inst.state, cfg.ssh.host or inst.address, inst.spot,
                            cost.estimate(client, cfg.ec2, inst))
        if inst.state != "running":
            return MachineStatus(cfg.target, info, None, None)
    with connect(cfg, trust_new_host=trust_new_host, log=log) as m:
        return MachineStatus(cfg.target, info, m.remote.host, Machine.from_json(m.probe("machine", m.root)))


def down(cfg: DeployConfig, *, force: bool = False, confirm: Callable[[str], bool] | None = None,
         trust_new_host: bool = False, log: Log = lambda _m: None) -> ec2.Instance | None:
    """Stop the instance; refuse while a run is active unless ``force``. ``confirm`` (a
    terminal's yes/no) may decline: None is returned and the instance keeps running."""
    require_ec2(cfg)
    client = ec2.client(cfg.ec2)
    inst = ec2.find_instance(client, cfg.ec2)
    if inst.state == "running" and not force:
        with connect(cfg, trust_new_host=trust_new_host, log=log) as m:
            active = [r.run_id for r in m.runs() if r.active]
        if active:
            raise BusyError(f"run {', '.join(active)} is still running on {inst.instance_id}: `orch stop` it first, "
                            "or pass --force to stop the instance anyway (the run dies; `orch resume RUN --continue` "
                            "picks it up later)")
    if inst.state == "running" and confirm is not None and not confirm(
            f"Stop instance {inst.instance_id} ({inst.instance_type})? Its disk, runs and data stay."):
        return None
    return ec2.stop(client, cfg.ec2, log=log)
