"""The EC2 instance: find it (id or Name tag), create it from ``ec2.launch`` (its AMI read from
SSM when named by a parameter), start/stop/terminate it with boto3 waiters, its address and the
SSH host key fingerprints it printed to its console."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.config import Ec2Config
from orchestrator.errors import AwsError, ConfigError, InstanceStopped

# Every AWS API action orch calls (the waiters poll DescribeInstances; RunInstances needs
# CreateTags to tag what it creates): README's IAM policy lists exactly these, and a test
# checks both against the calls in this module.
IAM_ACTIONS = ("ec2:DescribeInstances", "ec2:StartInstances", "ec2:StopInstances", "ec2:GetConsoleOutput",
               "ec2:DescribeSpotPriceHistory", "ec2:DescribeImages", "ec2:RunInstances", "ec2:CreateTags",
               "ec2:TerminateInstances", "ssm:GetParameter")
# Only with ec2.launch.iam_instance_profile: RunInstances hands the profile's role to the
# instance. README's policy grants it in a statement of its own, on that one role.
IAM_PASS_ROLE = "iam:PassRole"
# The tag that marks an instance orch created (besides its Name).
MANAGED_TAG = "orch:managed"
# botocore's "standard" mode retries exactly throttling and transient server errors.
_RETRIES = {"mode": "standard", "max_attempts": 6}
_FINGERPRINTS = re.compile(
    r"-----BEGIN SSH HOST KEY FINGERPRINTS-----(.*?)-----END SSH HOST KEY FINGERPRINTS-----", re.S)
_CLOUD_INIT_DONE = re.compile(r"Cloud-init v\. \S+ finished at")


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
    managed: bool = False  # orch created it (the orch:managed tag)
    state_reason: str | None = None  # EC2's StateReason code: Server.SpotInstanceTermination when it took it back

    @property
    def address(self) -> str | None:
        return self.public_dns or self.public_ip


def client(cfg: Ec2Config, service: str = "ec2") -> Any:
    """An EC2 (or SSM) client from boto3's credential chain (env, profile, instance role)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
        return session.client(service, endpoint_url=cfg.endpoint_url, config=Config(retries=_RETRIES))
    except (BotoCoreError, ValueError) as exc:  # ProfileNotFound, a bad region, an endpoint that is no URL
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
        if code in ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "AccessDeniedException"):
            raise AwsError(f"AWS refused {what}: {msg}") from exc
        hint = next((h for prefix, h in _HINTS.items() if code.startswith(prefix)), "")
        raise AwsError(f"AWS error while {what}: {code}: {msg}{hint}") from exc
    except BotoCoreError as exc:
        raise AwsError(f"AWS error while {what}: {exc}") from exc


# What to check when creating an instance fails (error codes, or their prefixes, of EC2 and SSM).
_HINTS = {
    "ParameterNotFound": "; check ec2.launch.ami and ec2.region",
    "InvalidAMIID": "; check ec2.launch.ami and ec2.region",
    "InvalidKeyPair": "; check ec2.launch.key_name (key pairs belong to a region)",
    "InvalidGroup": "; check ec2.launch.security_group_ids",
    "InvalidSubnetID": "; check ec2.launch.subnet_id",
    "InvalidParameterCombination": "; check ec2.launch (security groups and subnet must be of one VPC)",
    "NoSuchEntity": "; check ec2.launch.iam_instance_profile",
    "InsufficientInstanceCapacity": "; try another subnet (zone) or instance type, or later",
    "VcpuLimitExceeded": "; ask AWS for a higher vCPU quota for this instance family",
}


def find_instance(ec2: Any, cfg: Ec2Config, *, missing_ok: bool = False) -> Instance | None:
    """The configured instance; a clear error when it is missing, terminated or ambiguous.
    ``missing_ok``: None when no live instance has the name (ec2.launch creates one then)."""
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
    if missing_ok and not alive:
        return None
    creates = "" if not cfg.launch else \
        f"`orch up`{' (or `orch deploy`)' if cfg.start_if_stopped else ''} creates it from ec2.launch"
    if not alive and creates:
        raise AwsError(f"no instance named {cfg.name!r} in {cfg.region} yet: {creates}")
    if not found:
        raise AwsError(f"no instance with {label} in {cfg.region}; check ec2.name / ec2.instance_id and ec2.region")
    if not alive:
        raise AwsError(f"instance {found[0].instance_id} ({label}) is {found[0].state}; launch a new one "
                       "and update deploy.yaml (or give ec2.launch: orch creates it)")
    if len(alive) > 1:
        ids = ", ".join(i.instance_id for i in alive)
        fix = "rename or terminate all but one" if cfg.launch else "set ec2.instance_id instead"
        raise AwsError(f"{len(alive)} instances are named {cfg.name!r} ({ids}); {fix}")
    return alive[0]


def _found(ec2: Any, cfg: Ec2Config) -> Instance:
    """The configured instance, which must exist (it was just created or checked)."""
    inst = find_instance(ec2, cfg)
    assert inst is not None
    return inst


def describe(ec2: Any, instance_id: str) -> Instance:
    """One instance by id, whatever its state (a terminated one included)."""
    pages = _call("describing the instance", ec2.describe_instances, InstanceIds=[instance_id])
    return next(_instance(i) for r in pages["Reservations"] for i in r["Instances"])


def _instance(raw: dict[str, Any]) -> Instance:
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    return Instance(raw["InstanceId"], raw["State"]["Name"], raw.get("PublicDnsName") or None,
                    raw.get("PublicIpAddress") or None, tags.get("Name"), raw.get("InstanceType"),
                    raw.get("LaunchTime"), raw.get("InstanceLifecycle") == "spot",
                    (raw.get("Placement") or {}).get("AvailabilityZone"), tags.get(MANAGED_TAG) == "true",
                    (raw.get("StateReason") or {}).get("Code") or None)


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
    inst = _found(ec2, cfg)
    if inst.state == "stopping":
        _wait(ec2, "instance_stopped", inst.instance_id, log, "stopping")
        inst = _found(ec2, cfg)
    if inst.state == "stopped":
        if not allow_start:
            raise InstanceStopped(f"instance {inst.instance_id} is stopped; `orch up` starts it (this command "
                                  "does not: a running instance costs money)")
        if log:
            log(f"starting instance {inst.instance_id}")
        _call("starting the instance", ec2.start_instances, InstanceIds=[inst.instance_id])
    if inst.state != "running":
        _wait(ec2, "instance_running", inst.instance_id, log, "starting")
        inst = _found(ec2, cfg)
    return inst


def stop(ec2: Any, cfg: Ec2Config, log: Any = None) -> Instance:
    inst = _found(ec2, cfg)
    if inst.state == "pending":  # EC2 refuses to stop an instance that is still starting
        _wait(ec2, "instance_running", inst.instance_id, log, "starting, to stop it")
    if inst.state not in ("stopped", "stopping"):
        _call("stopping the instance", ec2.stop_instances, InstanceIds=[inst.instance_id])
    _wait(ec2, "instance_stopped", inst.instance_id, log, "stopping")
    return _found(ec2, cfg)


def terminate(ec2: Any, instance_id: str, log: Any = None) -> Instance:
    """Terminate the instance and wait until it is gone (its disk goes with it when its root
    volume is deleted on termination, as for every instance orch created)."""
    _call("terminating the instance", ec2.terminate_instances, InstanceIds=[instance_id])
    _wait(ec2, "instance_terminated", instance_id, log, "terminating")
    return describe(ec2, instance_id)


def resolve_ami(ssm: Any, ami: str) -> str:
    """An AMI id: ``ami`` itself, or the value of the SSM parameter it names."""
    if ami.startswith("ami-"):
        return ami
    answer = _call(f"reading the SSM parameter {ami}", ssm.get_parameter, Name=ami)
    value = str(answer.get("Parameter", {}).get("Value", "")).strip()
    if not re.fullmatch(r"ami-[0-9a-f]+", value):
        raise AwsError(f"the SSM parameter {ami} holds {value[:80]!r}, not an AMI id; check ec2.launch.ami")
    return value


def create(ec2: Any, ssm: Any, cfg: Ec2Config, log: Any = None) -> Instance:
    """Create the instance ``cfg.launch`` describes, named ``cfg.name`` and tagged as orch's
    (tagged as it is created: an untagged instance would be found by nothing). Returns at once
    (pending); :func:`ensure_running` waits for it."""
    spec = cfg.launch
    assert spec is not None and cfg.name
    image_id = resolve_ami(ssm, spec.ami)
    images = _call("describing the AMI", ec2.describe_images, ImageIds=[image_id]).get("Images") or []
    if not images:
        raise AwsError(f"AMI {image_id} does not exist in {cfg.region} (or is not shared with this account); "
                       "check ec2.launch.ami and ec2.region")
    root_device = images[0].get("RootDeviceName") or "/dev/sda1"
    ami_gb = next((m.get("Ebs", {}).get("VolumeSize") for m in images[0].get("BlockDeviceMappings") or []
                   if m.get("DeviceName") == root_device), None)
    if spec.volume_gb is not None and ami_gb is not None and spec.volume_gb < ami_gb:
        raise ConfigError(f"ec2.launch.volume_gb: {spec.volume_gb} GB is smaller than the root disk of AMI "
                          f"{image_id} ({ami_gb} GB)")
    tags = [{"Key": "Name", "Value": cfg.name}, {"Key": MANAGED_TAG, "Value": "true"}]
    ebs: dict[str, Any] = {"DeleteOnTermination": True}  # `orch down --terminate` leaves no paid disk behind
    if spec.volume_gb is not None or ami_gb is not None:
        ebs["VolumeSize"] = spec.volume_gb or ami_gb
    params: dict[str, Any] = {
        "ImageId": image_id, "InstanceType": spec.instance_type, "MinCount": 1, "MaxCount": 1,
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
        "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": ebs}],
        # shutdown -h (autostop) stops it, keeping its disk; never terminates it
        "InstanceInitiatedShutdownBehavior": "stop",
    }
    if spec.key_name:
        params["KeyName"] = spec.key_name
    if spec.security_group_ids:
        params["SecurityGroupIds"] = spec.security_group_ids
    if spec.subnet_id:
        params["SubnetId"] = spec.subnet_id
    if spec.iam_instance_profile:
        key = "Arn" if spec.iam_instance_profile.startswith("arn:") else "Name"
        params["IamInstanceProfile"] = {key: spec.iam_instance_profile}
    # RunInstances' ClientToken is filled in by botocore and kept across its retries: a retried
    # call never creates a second instance.
    raw = _call("creating the instance", ec2.run_instances, **params)["Instances"][0]
    inst = _instance(raw)
    if log:
        log(f"created instance {inst.instance_id} ({spec.instance_type}, {image_id}) named {cfg.name}")
    return inst


def _wait(ec2: Any, waiter: str, instance_id: str, log: Any, doing: str) -> None:
    if log:
        log(f"waiting for instance {instance_id} ({doing})")
    _call(f"waiting for the instance ({waiter})", ec2.get_waiter(waiter).wait,
          InstanceIds=[instance_id], WaiterConfig={"Delay": 5, "MaxAttempts": 120})


def console_fingerprints(ec2: Any, instance_id: str, *, wait: float = 0.0, log: Any = None) -> set[str]:
    """SHA256 host key fingerprints from the instance's console output (cloud-init prints
    them between BEGIN/END SSH HOST KEY FINGERPRINTS); empty when there are none. ``wait``: a
    new instance prints them some time after SSH answers: ask again for up to that long
    (until cloud-init says it finished)."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        out = _call("reading the console output", ec2.get_console_output, InstanceId=instance_id, Latest=True)
        text = out.get("Output") or ""
        found = {fp for block in _FINGERPRINTS.findall(text) for fp in re.findall(r"SHA256:[A-Za-z0-9+/]+", block)}
        if found or time.monotonic() >= deadline or _CLOUD_INIT_DONE.search(text):
            return found
        if log and not said:
            log(f"waiting for instance {instance_id} to print its SSH host key fingerprints on its console")
            said = True
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
