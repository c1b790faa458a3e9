"""The EC2 instance: find it (id or Name tag), start/stop it with boto3 waiters, its address
and the SSH host key fingerprints it printed to its console."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.config import Ec2Config
from orchestrator.errors import AwsError, InstanceStopped

# Every EC2 API action orch calls (the waiters poll DescribeInstances): README's IAM policy
# lists exactly these, and a test checks both against the calls in this module.
IAM_ACTIONS = ("ec2:DescribeInstances", "ec2:StartInstances", "ec2:StopInstances", "ec2:GetConsoleOutput",
               "ec2:DescribeSpotPriceHistory")
# botocore's "standard" mode retries exactly throttling and transient server errors.
_RETRIES = {"mode": "standard", "max_attempts": 6}
_FINGERPRINTS = re.compile(
    r"-----BEGIN SSH HOST KEY FINGERPRINTS-----(.*?)-----END SSH HOST KEY FINGERPRINTS-----", re.S)


@dataclass(frozen=True)
class Instance:
    instance_id: str
    state: str
    public_dns: str | None
    public_ip: str | None
    name: str | None
    instance_type: str | None = None
    launch_time: datetime | None = None  # when it last started
    spot: bool = False
    zone: str | None = None

    @property
    def address(self) -> str | None:
        return self.public_dns or self.public_ip


def client(cfg: Ec2Config) -> Any:
    """An EC2 client from boto3's credential chain (env, profile, instance role)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
        return session.client("ec2", endpoint_url=cfg.endpoint_url, config=Config(retries=_RETRIES))
    except BotoCoreError as exc:  # ProfileNotFound, a bad region or endpoint...
        raise AwsError(f"AWS: {exc}; check ec2.profile, ec2.region and ~/.aws/config") from exc


def _call(what: str, fn: Any, **kwargs: Any) -> Any:
    """Call boto3, turning its errors into one-line AwsErrors."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        ProfileNotFound,
    )

    try:
        return fn(**kwargs)
    except NoCredentialsError as exc:
        raise AwsError("no AWS credentials found: set ec2.profile (or AWS_PROFILE), or run "
                       "`aws configure`; credentials never go into deploy.yaml") from exc
    except ProfileNotFound as exc:
        raise AwsError(f"AWS profile not found: {exc}; check ec2.profile") from exc
    except NoRegionError as exc:
        raise AwsError("no AWS region: set ec2.region") from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        msg = exc.response.get("Error", {}).get("Message", str(exc))
        if code in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            raise AwsError(f"no such instance: {msg}; check ec2.instance_id and ec2.region") from exc
        if code in ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId"):
            raise AwsError(f"AWS refused {what}: {msg}") from exc
        raise AwsError(f"AWS error while {what}: {code}: {msg}") from exc
    except BotoCoreError as exc:
        raise AwsError(f"AWS error while {what}: {exc}") from exc


def find_instance(ec2: Any, cfg: Ec2Config) -> Instance:
    """The configured instance; a clear error when it is missing, terminated or ambiguous."""
    if cfg.instance_id:
        pages = _call("describing the instance", ec2.describe_instances, InstanceIds=[cfg.instance_id])
        found = [_instance(i) for r in pages["Reservations"] for i in r["Instances"]]
        label = cfg.instance_id
    else:
        pages = _call("looking up the instance by name", ec2.describe_instances,
                      Filters=[{"Name": "tag:Name", "Values": [cfg.name]}])
        found = [_instance(i) for r in pages["Reservations"] for i in r["Instances"]]
        label = f"Name={cfg.name}"
    alive = [i for i in found if i.state not in ("terminated", "shutting-down")]
    if not found:
        raise AwsError(f"no instance with {label} in {cfg.region}; check ec2.name / ec2.instance_id and ec2.region")
    if not alive:
        raise AwsError(f"instance {found[0].instance_id} ({label}) is {found[0].state}; launch a new one "
                       "and update deploy.yaml")
    if len(alive) > 1:
        ids = ", ".join(i.instance_id for i in alive)
        raise AwsError(f"{len(alive)} instances are named {cfg.name!r} ({ids}); set ec2.instance_id instead")
    return alive[0]


def _instance(raw: dict[str, Any]) -> Instance:
    name = next((t["Value"] for t in raw.get("Tags", []) if t["Key"] == "Name"), None)
    return Instance(raw["InstanceId"], raw["State"]["Name"], raw.get("PublicDnsName") or None,
                    raw.get("PublicIpAddress") or None, name, raw.get("InstanceType"), raw.get("LaunchTime"),
                    raw.get("InstanceLifecycle") == "spot", (raw.get("Placement") or {}).get("AvailabilityZone"))


def spot_price(ec2: Any, inst: Instance) -> float | None:
    """The current spot price of the instance's type in its zone (Linux), or None."""
    if not inst.instance_type:
        return None
    kwargs = {"AvailabilityZone": inst.zone} if inst.zone else {}
    history = _call("reading the spot price", ec2.describe_spot_price_history, InstanceTypes=[inst.instance_type],
                    ProductDescriptions=["Linux/UNIX"], MaxResults=1, **kwargs)
    prices = history.get("SpotPriceHistory") or []
    return float(prices[0]["SpotPrice"]) if prices else None


def ensure_running(ec2: Any, cfg: Ec2Config, allow_start: bool, log: Any = None) -> Instance:
    """Start the instance if it is stopped (and allowed), and wait until it runs."""
    inst = find_instance(ec2, cfg)
    if inst.state == "stopping":
        _wait(ec2, "instance_stopped", inst.instance_id, log, "stopping")
        inst = find_instance(ec2, cfg)
    if inst.state == "stopped":
        if not allow_start:
            raise InstanceStopped(f"instance {inst.instance_id} is stopped; `orch up` starts it (this command "
                                  "does not: a running instance costs money)")
        if log:
            log(f"starting instance {inst.instance_id}")
        _call("starting the instance", ec2.start_instances, InstanceIds=[inst.instance_id])
    if inst.state != "running":
        _wait(ec2, "instance_running", inst.instance_id, log, "starting")
        inst = find_instance(ec2, cfg)
    return inst


def stop(ec2: Any, cfg: Ec2Config, log: Any = None) -> Instance:
    inst = find_instance(ec2, cfg)
    if inst.state not in ("stopped", "stopping"):
        _call("stopping the instance", ec2.stop_instances, InstanceIds=[inst.instance_id])
    _wait(ec2, "instance_stopped", inst.instance_id, log, "stopping")
    return find_instance(ec2, cfg)


def _wait(ec2: Any, waiter: str, instance_id: str, log: Any, doing: str) -> None:
    if log:
        log(f"waiting for instance {instance_id} ({doing})")
    _call(f"waiting for the instance ({waiter})", ec2.get_waiter(waiter).wait,
          InstanceIds=[instance_id], WaiterConfig={"Delay": 5, "MaxAttempts": 120})


def console_fingerprints(ec2: Any, instance_id: str) -> set[str]:
    """SHA256 host key fingerprints from the instance's console output (cloud-init prints
    them between BEGIN/END SSH HOST KEY FINGERPRINTS); empty when there are none."""
    out = _call("reading the console output", ec2.get_console_output, InstanceId=instance_id, Latest=True)
    text = out.get("Output") or ""
    return {fp for block in _FINGERPRINTS.findall(text) for fp in re.findall(r"SHA256:[A-Za-z0-9+/]+", block)}
