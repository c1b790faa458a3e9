"""The EC2 instance: find it (id or Name tag), create it from ``ec2.launch`` (its AMI read from
SSM when named by a parameter; on-demand or spot), start/stop/terminate it with boto3 waiters,
its address and the SSH host key fingerprints it printed to its console."""

from __future__ import annotations

import random
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.config import Ec2Config, Ec2SpotConfig
from orchestrator.errors import AwsError, ConfigError, InstanceStopped, NoCapacity

# Every AWS API action orch calls (the waiters poll DescribeInstances; RunInstances needs
# CreateTags to tag what it creates): README's IAM policy lists exactly these, and a test
# checks both against the calls in this module.
IAM_ACTIONS = ("ec2:DescribeInstances", "ec2:StartInstances", "ec2:StopInstances", "ec2:GetConsoleOutput",
               "ec2:DescribeSpotPriceHistory", "ec2:DescribeImages", "ec2:RunInstances", "ec2:CreateTags",
               "ec2:TerminateInstances", "ec2:CancelSpotInstanceRequests", "ssm:GetParameter")
# Only with ec2.launch.iam_instance_profile: RunInstances hands the profile's role to the
# instance. README's policy grants it in a statement of its own, on that one role.
IAM_PASS_ROLE = "iam:PassRole"
# The tag that marks an instance orch created (besides its Name).
MANAGED_TAG = "orch:managed"
# botocore's "standard" mode retries exactly throttling and transient server errors.
_RETRIES = {"mode": "standard", "max_attempts": 6}
# ... and every HTTP 500, which is how EC2 answers InsufficientInstanceCapacity: RunInstances goes
# through a client without botocore's retries (a refusal reaches the fallback or the recovery's
# backoff at once, not after five blind retries), and _call asks again only for these, with
# the same ClientToken (a retried call never creates a second instance).
_NO_RETRIES = {"mode": "standard", "total_max_attempts": 1}  # (botocore's "max_attempts" counts retries only)
# AWS's error codes (or their prefixes) for a throttle or a hiccup of its own: worth asking again.
TRANSIENT_CODES = ("RequestLimitExceeded", "Throttling", "InternalError", "InternalFailure", "ServiceUnavailable",
                   "Unavailable", "RequestTimeout")
_LAUNCH_ATTEMPTS = 5
# EC2's refusals that mean "no capacity, or not at this price, now" for the instance asked (its
# type's pool in a zone, the spot market), as opposed to a request that can never succeed: they
# are NoCapacity, which a recovery retries with backoff and ec2.launch.fallback_on_demand turns
# into an on-demand request. (EC2 API reference, "Error codes": InsufficientInstanceCapacity is
# a server error, HTTP 500; the others are client errors.) Not among them: VcpuLimitExceeded and
# InstanceLimitExceeded (on-demand quotas), Unsupported (a type the zone does not offer),
# InsufficientFreeAddressesInSubnet (a full subnet): waiting does not fix them.
CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity",  # no spare capacity of the type in the zone (on-demand or spot)
    "InsufficientCapacity",          # not enough capacity for the request
    "UnfulfillableCapacity",         # no spare spot capacity for the request
    "SpotMaxPriceTooLow",            # the spot price is above the request's maximum price
    "MaxSpotInstanceCountExceeded",  # the account's spot quota (vCPUs of running spot instances) is used up
})
# What to do about a refusal (the capacity ones: elsewhere, or later).
_REMEDIES = {
    "SpotMaxPriceTooLow": "raise ec2.launch.spot.max_price (null: up to the on-demand price)",
    "MaxSpotInstanceCountExceeded": "ask AWS for a higher spot vCPU quota (Service Quotas), or end other spot "
                                    "instances",
}
_ELSEWHERE = "try another ec2.launch.subnet_id (zone) or instance_type, or again later"
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
    spot_request: str | None = None  # the spot request it came from (a persistent one outlives it)
    state_reason: str | None = None  # EC2's StateReason code: Server.SpotInstanceTermination when it took it back

    @property
    def address(self) -> str | None:
        return self.public_dns or self.public_ip


def client(cfg: Ec2Config, service: str = "ec2", *, retries: bool = True) -> Any:
    """An EC2 (or SSM) client from boto3's credential chain (env, profile, instance role).
    ``retries=False``: one without botocore's retries, for RunInstances (see _NO_RETRIES)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
        return session.client(service, endpoint_url=cfg.endpoint_url,
                              config=Config(retries=_RETRIES if retries else _NO_RETRIES))
    except (BotoCoreError, ValueError) as exc:  # ProfileNotFound, a bad region, an endpoint that is no URL
        raise AwsError(f"AWS: {exc}; check ec2.profile, ec2.region and ~/.aws/config") from exc


def _call(what: str, fn: Any, *, attempts: int = 1, **kwargs: Any) -> Any:
    """Call boto3, turning its errors into one-line AwsErrors (NoCapacity for EC2's capacity and
    price refusals). ``attempts``: for a client without botocore's retries, how many times to ask
    while EC2 throttles or hiccups (never again after a refusal)."""
    from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    for attempt in range(1, attempts + 1):
        try:
            return fn(**kwargs)
        except (ClientError, BotoConnectionError, HTTPClientError) as exc:
            # a throttle or hiccup of EC2's, a dropped connection or a timeout: worth asking again
            transient = not isinstance(exc, ClientError) or passes(exc.response.get("Error", {}).get("Code", ""))
            if attempt == attempts or not transient:
                raise _aws_error(what, exc) from exc
            time.sleep(min(8.0, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0))  # jittered backoff
        except BotoCoreError as exc:
            raise _aws_error(what, exc) from exc
    raise AssertionError("unreachable")  # the last attempt returns or raises


def passes(code: str) -> bool:
    """Whether an AWS error, by its code, may pass when asked again: a throttle or AWS's own
    hiccup, or no answer at all (``""``: the network)."""
    return not code or code.startswith(TRANSIENT_CODES)


def _aws_error(what: str, exc: Exception) -> AwsError:
    """One line for a boto3 error: what failed, AWS's code and message, and what to check."""
    from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError, ProfileNotFound

    if isinstance(exc, NoCredentialsError):
        return AwsError("no AWS credentials found: set ec2.profile (or AWS_PROFILE), or run "
                        "`aws configure`; credentials never go into deploy.yaml")
    if isinstance(exc, ProfileNotFound):
        return AwsError(f"AWS profile not found: {exc}; check ec2.profile")
    if isinstance(exc, NoRegionError):
        return AwsError("no AWS region: set ec2.region")
    if not isinstance(exc, ClientError):
        return AwsError(f"AWS error while {what}: {exc}")
    code = exc.response.get("Error", {}).get("Code", "")
    msg = _one_line(exc.response.get("Error", {}).get("Message", str(exc)))
    if code in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
        return AwsError(f"no such instance: {msg}; check ec2.instance_id and ec2.region", code, f"{code}: {msg}")
    if code in ("AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "AccessDeniedException"):
        return AwsError(f"AWS refused {what}: {msg}", code, f"{code}: {msg}")
    if code in CAPACITY_CODES:
        msg = msg.rstrip(".")  # a remedy follows
        return NoCapacity(f"EC2 refused {what}: {code}: {msg}; {_REMEDIES.get(code, 'try again later')}",
                          code, f"{code}: {msg}")
    hint = next((h for prefix, h in _HINTS.items() if code.startswith(prefix)), "")
    return AwsError(f"AWS error while {what}: {code}: {msg}{hint}", code, f"{code}: {msg}")


def _one_line(text: str, limit: int = 400) -> str:
    """AWS's message on one line, bounded (EC2's capacity messages list zones, and can be long)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# What to check when creating an instance fails (error codes, or their prefixes, of EC2 and SSM).
_HINTS = {
    "ParameterNotFound": "; check ec2.launch.ami and ec2.region",
    "InvalidAMIID": "; check ec2.launch.ami and ec2.region",
    "InvalidKeyPair": "; check ec2.launch.key_name (key pairs belong to a region)",
    "InvalidGroup": "; check ec2.launch.security_group_ids",
    "InvalidSubnetID": "; check ec2.launch.subnet_id",
    "InvalidParameterCombination": "; check ec2.launch (security groups and subnet must be of one VPC)",
    "NoSuchEntity": "; check ec2.launch.iam_instance_profile",
    "AuthFailure.ServiceLinkedRoleCreationNotPermitted": "; a spot instance needs EC2's spot service-linked role: "
    "create it once (`aws iam create-service-linked-role --aws-service-name spot.amazonaws.com`)",
    "VcpuLimitExceeded": "; ask AWS for a higher vCPU quota for this instance family",
}


def tagged(ec2: Any, tags: dict[str, str]) -> list[Instance]:
    """Every live instance (not terminated) that carries all of ``tags``."""
    pages = _call("looking up instances by tag", ec2.describe_instances,
                  Filters=[{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()])
    found = [_instance(i) for r in pages["Reservations"] for i in r["Instances"]]
    return [i for i in found if i.state not in ("terminated", "shutting-down")]


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
                    raw.get("SpotInstanceRequestId") or None, (raw.get("StateReason") or {}).get("Code") or None)


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
        start(ec2, inst.instance_id)
    if inst.state != "running":
        _wait(ec2, "instance_running", inst.instance_id, log, "starting")
        inst = _found(ec2, cfg)
    return inst


def start(ec2: Any, instance_id: str) -> None:
    """Ask EC2 to start a stopped instance (returns at once; EC2 may refuse: no capacity, or a
    spot instance it stopped itself, which only EC2 starts again)."""
    _call("starting the instance", ec2.start_instances, InstanceIds=[instance_id])


def stop(ec2: Any, cfg: Ec2Config, log: Any = None) -> Instance:
    inst = _found(ec2, cfg)
    if inst.state == "pending":  # EC2 refuses to stop an instance that is still starting
        _wait(ec2, "instance_running", inst.instance_id, log, "starting, to stop it")
    if inst.state not in ("stopped", "stopping"):
        try:
            _call("stopping the instance", ec2.stop_instances, InstanceIds=[inst.instance_id])
        except AwsError as exc:
            if not (inst.spot and exc.code == "UnsupportedOperation"):
                raise
            raise AwsError(f"{exc}; a spot instance of a one-time request (ec2.launch.spot.interruption: terminate) "
                           "cannot be stopped: `orch down --terminate` ends it and its disk (runs in storage stay)",
                           exc.code, exc.detail) from exc
    _wait(ec2, "instance_stopped", inst.instance_id, log, "stopping")
    return _found(ec2, cfg)


def terminate(ec2: Any, instance_id: str, log: Any = None, *, cancel_request: bool = True) -> Instance:
    """Terminate the instance and wait until it is gone (its disk goes with it when its root
    volume is deleted on termination, as for every instance orch created). A spot instance's
    request is cancelled first: a persistent one would otherwise launch a new instance (and
    bill it) once this one is gone. ``cancel_request=False``: a one-time request's instance (its
    request ends with it; a refused cancel must not keep it running)."""
    request = describe(ec2, instance_id).spot_request if cancel_request else None
    if request:
        cancel_spot_request(ec2, request, log)
    _call("terminating the instance", ec2.terminate_instances, InstanceIds=[instance_id])
    _wait(ec2, "instance_terminated", instance_id, log, "terminating")
    return describe(ec2, instance_id)


def cancel_spot_request(ec2: Any, request_id: str, log: Any = None) -> None:
    """Cancel a spot request (its instance keeps running: terminating it is the caller's). One
    that EC2 no longer knows (closed and expired) is already gone."""
    if log:
        log(f"cancelling spot request {request_id} first (a persistent one would launch a new instance)")
    try:
        _call("cancelling the spot request", ec2.cancel_spot_instance_requests, SpotInstanceRequestIds=[request_id])
    except AwsError as exc:
        if exc.code != "InvalidSpotInstanceRequestID.NotFound":
            raise


def market_options(spot: Ec2SpotConfig) -> dict[str, Any]:
    """RunInstances' InstanceMarketOptions for ``ec2.launch.spot``. EC2 stops (or hibernates) an
    instance only for a persistent request and refuses a one-time one with ``stop``: a one-time
    request when it terminates the instance, a persistent one when it stops it. No MaxPrice:
    up to the on-demand price (EC2's default)."""
    options: dict[str, Any] = {"SpotInstanceType": "persistent" if spot.interruption == "stop" else "one-time",
                               "InstanceInterruptionBehavior": spot.interruption}
    if spot.max_price is not None:
        options["MaxPrice"] = usd(spot.max_price)
    return {"MarketType": "spot", "SpotOptions": options}


def usd(price: float) -> str:
    """A price as EC2 reads it: plain decimals, never an exponent (str(1e-05) is '1e-05')."""
    return f"{price:.6f}".rstrip("0").rstrip(".")


def resolve_ami(ssm: Any, ami: str) -> str:
    """An AMI id: ``ami`` itself, or the value of the SSM parameter it names."""
    if ami.startswith("ami-"):
        return ami
    answer = _call(f"reading the SSM parameter {ami}", ssm.get_parameter, Name=ami)
    value = str(answer.get("Parameter", {}).get("Value", "")).strip()
    if not re.fullmatch(r"ami-[0-9a-f]+", value):
        raise AwsError(f"the SSM parameter {ami} holds {value[:80]!r}, not an AMI id; check ec2.launch.ami")
    return value


def create(ec2: Any, ssm: Any, cfg: Ec2Config, log: Any = None, launcher: Any = None) -> Instance:
    """Create the instance ``cfg.launch`` describes, named ``cfg.name`` and tagged as orch's
    (tagged as it is created: an untagged instance would be found by nothing), on-demand or, with
    ``launch.spot``, spot (refused: on-demand with ``launch.fallback_on_demand``, else NoCapacity).
    ``launcher``: the client RunInstances goes through, one without botocore's retries
    (``client(cfg, retries=False)``); default ``ec2``. Returns at once (pending);
    :func:`ensure_running` waits for it."""
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
    tags = [{"Key": "Name", "Value": cfg.name}, {"Key": MANAGED_TAG, "Value": "true"},
            *({"Key": k, "Value": v} for k, v in spec.tags.items())]
    ebs: dict[str, Any] = {"DeleteOnTermination": True}  # `orch down --terminate` leaves no paid disk behind
    if spec.volume_gb is not None or ami_gb is not None:
        ebs["VolumeSize"] = spec.volume_gb or ami_gb
    params: dict[str, Any] = {
        "ImageId": image_id, "InstanceType": spec.instance_type, "MinCount": 1, "MaxCount": 1,
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
        "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": ebs}],
        # shutdown -h (autostop) stops it, keeping its disk; never terminates it (but a one-time
        # spot instance, which EC2 cannot stop: below)
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
    run = launcher or ec2
    spot = spec.spot
    market = "on-demand"
    try:
        if spot is None:
            raw = _run(run, params)
        else:
            # EC2 stops only a persistent request's spot instance: a one-time one is terminated
            # when it shuts down (autostop), and orch asks for exactly that rather than "stop".
            shutdown = "stop" if spot.interruption == "stop" else "terminate"
            raw = _run(run, {**params, "InstanceMarketOptions": market_options(spot),
                             "InstanceInitiatedShutdownBehavior": shutdown})
            market = f"spot, {market_options(spot)['SpotOptions']['SpotInstanceType']}, {_max_price(spot)}"
    except NoCapacity as exc:
        if spot is None or not spec.fallback_on_demand:
            raise NoCapacity(_refusal(cfg, spot, exc), exc.code, exc.detail) from exc
        if log:
            log(f"EC2 refused the spot request ({exc.detail}): creating an on-demand instance instead "
                "(ec2.launch.fallback_on_demand)")
        try:
            raw = _run(run, params)
        except NoCapacity as again:
            raise NoCapacity(_refusal(cfg, None, again, spot_refused=exc.code), again.code, again.detail) from again
    inst = _instance(raw)
    if log:
        log(f"created instance {inst.instance_id} ({spec.instance_type}, {market}, {image_id}) named {cfg.name}")
    return inst


def _run(ec2: Any, params: dict[str, Any]) -> dict[str, Any]:
    """RunInstances, asked again only while EC2 throttles or hiccups, with one ClientToken (set
    here: botocore would make a new one per call), so a retried call never creates a second
    instance. Returns the instance it created."""
    return _call("creating the instance", ec2.run_instances, attempts=_LAUNCH_ATTEMPTS,
                 ClientToken=str(uuid.uuid4()), **params)["Instances"][0]


def _max_price(spot: Ec2SpotConfig) -> str:
    return f"max ${usd(spot.max_price)}/hour" if spot.max_price is not None else "up to the on-demand price"


def _refusal(cfg: Ec2Config, spot: Ec2SpotConfig | None, exc: NoCapacity, spot_refused: str = "") -> str:
    """NoCapacity's one line for a refused RunInstances: what was asked (market, type, price,
    where), EC2's words, and what to do."""
    spec = cfg.launch
    assert spec is not None
    where = f"subnet {spec.subnet_id}" if spec.subnet_id else f"any zone of {cfg.region}"
    if spot is not None:
        asked = f"the spot request ({spec.instance_type}, {_max_price(spot)}, {where})"
        fallback = "; or set ec2.launch.fallback_on_demand: true for an on-demand instance instead"
    else:
        asked = f"the on-demand request ({spec.instance_type}, {where})"
        if spot_refused:
            asked = f"the spot request ({spot_refused}) and {asked}"
        fallback = ""
    return f"EC2 refused {asked}: {exc.detail}; {_REMEDIES.get(exc.code, _ELSEWHERE)}{fallback}"


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
