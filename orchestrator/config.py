"""deploy.yaml: a pydantic model (unknown keys are errors) with a description per field."""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    create_model,
    model_validator,
)

from orchestrator.errors import ConfigError
from trainer.contract import notify as notify_contract
from trainer.contract import options as trainer_options


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_AMI_ID = re.compile(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_SSM_NAME = re.compile(r"/[A-Za-z0-9_.\-/]{1,2047}")  # a hierarchical SSM parameter name


def _ami(value: str) -> str:
    if not (_AMI_ID.fullmatch(value) or _SSM_NAME.fullmatch(value)):
        raise ValueError(f"give an AMI id (ami-0123456789abcdef0) or the name of an SSM parameter holding one "
                         f"(e.g. /aws/service/deeplearning/ami/x86_64/...), not {value!r}")
    return value


def _aws_id(prefix: str, example: str) -> Any:
    """A check that a value is an AWS resource id such as sg-0123abcd."""
    pattern = re.compile(rf"{prefix}-[0-9a-f]{{8,17}}")

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"give a {prefix}-... id (e.g. {example}), not {value!r}")
        return value

    return AfterValidator(check)


def _instance_type(value: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9-]*\.[a-z0-9-]+", value):
        raise ValueError(f"give an EC2 instance type such as g5.xlarge, not {value!r}")
    return value


class Ec2SpotConfig(_Section):
    """A spot instance instead of an on-demand one (about a third of the price; EC2 may take it
    back with a 2-minute notice, which the machine's watcher acts on)."""

    max_price: float | None = Field(None, gt=0, description="the most USD per hour to pay; null: up to the "
                                    "on-demand price (EC2's default)")
    interruption: Literal["terminate", "stop"] = Field(
        "terminate", description="what EC2 does when it takes the instance back: terminate (a one-time request: "
        "`--recover` creates a new instance and restores the run from storage) or stop (a persistent request: "
        "the disk stays and EC2 starts the instance again when capacity returns)")


def _spot(value: Any) -> Any:
    # `spot: false` (the old spelling of on-demand) and `spot: true` (the defaults) read as before
    if value is False:
        return None
    return {} if value is True else value


class Ec2LaunchConfig(_Section):
    """How `orch up` (and `orch deploy`) create the instance when none is named ec2.name."""

    instance_type: Annotated[str, AfterValidator(_instance_type)] = Field(
        description="the instance type to create (e.g. g5.xlarge: one A10G GPU)")
    ami: Annotated[str, AfterValidator(_ami)] = Field(
        description="an AMI id (ami-...), or the name of an SSM parameter that holds one (read with "
        "ssm:GetParameter when the instance is created), e.g. a Deep Learning AMI's "
        "/aws/service/deeplearning/ami/x86_64/...")
    key_name: str | None = Field(None, min_length=1, description="the EC2 key pair to log in with (ssh.key_file "
                                 "is its .pem); null: the AMI's own login")
    security_group_ids: list[Annotated[str, _aws_id("sg", "sg-0123456789abcdef0")]] = Field(
        default_factory=list, description="security groups (sg-...; inbound TCP 22 from your address only); "
        "empty: the VPC's default group")
    subnet_id: Annotated[str | None, _aws_id("subnet", "subnet-0123456789abcdef0")] = Field(
        None, description="the subnet (subnet-...) to create it in; null: the default VPC's, any zone")
    volume_gb: int | None = Field(None, ge=8, le=16384, description="size of the root disk in GB (8 to 16384; "
                                  "code, envs, runs and data live there); null: the AMI's size")
    iam_instance_profile: str | None = Field(
        None, min_length=1, description="an instance profile (name or arn:aws:iam::...) for the instance's own AWS "
        "calls; passing one needs iam:PassRole on its role")
    spot: Annotated[Ec2SpotConfig | None, BeforeValidator(_spot)] = Field(
        None, description="request a spot instance ({max_price, interruption}; `true`: the defaults); "
        "null or false: on-demand")
    fallback_on_demand: bool = Field(False, description="when EC2 refuses the spot request (no capacity, price too "
                                     "low), create an on-demand instance instead (and say so); false: fail")


class Ec2Config(_Section):
    region: str = Field("us-east-1", description="AWS region of the instance")
    profile: str | None = Field(None, description="AWS profile name (credentials never live in this file)")
    instance_id: str | None = Field(None, description="the instance id (i-...); or give `name`")
    name: str | None = Field(None, description="the instance's Name tag; or give `instance_id`")
    start_if_stopped: bool = Field(True, description="let deploy and resume start a stopped instance (no other "
                                   "command ever starts one: `orch up` does)")
    endpoint_url: str | None = Field(None, description="an AWS-compatible endpoint for EC2 and SSM (tests use "
                                     "moto's server)")
    hourly_price: float | None = Field(None, ge=0, description="USD per hour of the instance, for `orch status`'s "
                                       "cost estimate (default: the spot price, or orch's dated on-demand table)")
    launch: Ec2LaunchConfig | None = Field(
        None, description="create the instance from this spec when none is named ec2.name (`orch up`, `orch "
        "deploy`); null: the instance must exist")
    metadata_url: str = Field("http://169.254.169.254", pattern=r"^https?://[^\s/]+/?$",
                              description="the instance metadata service the machine's watcher asks (IMDSv2 "
                              "only) for spot interruption notices (tests point it at a stand-in)")

    @model_validator(mode="after")
    def _launch_needs_name(self) -> Ec2Config:
        if self.launch is not None and not self.name:
            raise ValueError("launch: needs ec2.name (the Name tag of the instance it creates and finds again), "
                             "not ec2.instance_id")
        return self


class SshConfig(_Section):
    host: str | None = Field(None, description="target ssh: required (an address or a Host alias of "
                             "ssh.config_file); target ec2: overrides the instance's address")
    port: int | None = Field(None, ge=1, le=65535, description="SSH port (default: ssh_config's Port, else 22)")
    user: str | None = Field(None, description="login user (default: ssh_config's User, else ubuntu)")
    key_file: str | None = Field(None, description="private key path (default: ssh_config's IdentityFile, "
                                 "else ssh-agent and the default keys)")
    known_hosts: str | None = Field(None, description="known_hosts file (default ~/.ssh/known_hosts); unknown "
                                    "or changed host keys are refused")
    config_file: str | None = Field("~/.ssh/config", description="OpenSSH client config whose HostName, User, "
                                    "Port, IdentityFile and ProxyJump apply (null: none)")
    connect_timeout: float = Field(10, gt=0, le=3600, description="seconds to wait for the SSH connection")


_URL_CREDENTIALS = re.compile(r"://[^/\s]*@")


def _no_credentials(value: Any) -> Any:
    """A URL with user:password@ would land in logs, run folders and `ps` on the machine."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and _URL_CREDENTIALS.search(text):
            raise ValueError("credentials do not belong in deploy.yaml (they would end up in logs and run "
                             "folders): put them in ~/.netrc or pip.conf on the machine")
    return value


class EnvConfig(_Section):
    mode: Literal["auto", "managed", "off"] = Field(
        "auto", description="auto: a managed virtualenv on ssh/ec2 targets when remote.python is not set; managed: "
        "always; off: never (base_python, or for target local the Python running orch, trains)")
    base_python: str = Field("python3", description="interpreter on the machine that creates the env and runs "
                             "orch's small helpers there (pure Python, any python3 >= 3.8)")
    packages_from: str | None = Field(None, description="an interpreter on the machine whose packages the env "
                                      "reuses (e.g. a Deep Learning AMI's): only what is missing is installed")
    index_url: Annotated[str | None, AfterValidator(_no_credentials)] = Field(
        None, description="pip --index-url for the env (default: pip's); credentials go in ~/.netrc on the machine")
    pip_args: Annotated[list[str], AfterValidator(_no_credentials)] = Field(
        default_factory=list, description="more `pip install` arguments for the env (e.g. [--find-links, /wheels])")


class RemoteConfig(_Section):
    root: str = Field("~/audio_emotion", min_length=1,
                      description="where code, runs, envs and (by default) data live on the machine; relative "
                      "paths are relative to the login's home folder")
    python: str | None = Field(None, description="an interpreter with TensorFlow on the machine, used as it is (no "
                               "managed env); default: the managed env (ssh/ec2) or the Python running orch (local)")
    env: EnvConfig = Field(default_factory=EnvConfig, description="the managed virtualenv (remote.root/envs/<hash>/)")
    setup: str | None = Field(None, description="shell command run once per code version, in the code folder "
                              "beside requirements.txt (e.g. `pip install -r requirements.txt`)")
    min_free_gb: float = Field(2.0, ge=0, description="refuse to launch with less free disk than this on the runs' "
                               "file system (checkpoints are written every epoch)")


class AutostopConfig(_Section):
    idle_minutes: float | None = Field(None, gt=0, description="run `command` on the machine once no run has been "
                                       "active for this long (fractions allowed); null: no autostop. A watcher on "
                                       "the machine does it: a closed laptop does not matter")
    command: str = Field("sudo shutdown -h now", description="what autostop runs; an EC2 instance with the default "
                         "shutdown behaviour stops (its EBS disk, runs and data stay)")


class RecoverConfig(_Section):
    """How `orch deploy --recover` and `orch watch` bring a run back after its machine is taken."""

    max_recoveries: int = Field(3, ge=0, le=1000, description="give up after this many recoveries within "
                                "`window` minutes (each success resets the backoff, not this count)")
    window: float = Field(1440, gt=0, description="minutes over which max_recoveries counts")
    max_restarts_on_errors: int = Field(0, ge=0, le=100, description="restart a run whose trainer failed while "
                                        "its instance was alive this many times (a failure of the run itself, "
                                        "not of the machine: 0 never restarts it)")
    poll_seconds: float = Field(15, gt=0, le=3600, description="seconds between asking EC2 (and the machine) how "
                                "the run is")
    backoff_seconds: float = Field(60, gt=0, le=3600, description="first wait after a failed recovery attempt "
                                   "(doubled each time, up to 16x)")


class MonitorConfig(_Section):
    stall_seconds: float | None = Field(None, gt=0, description="a running trainer with no sign of life (no batch "
                                        "trained, no file loaded) for this long is shown as stalled; default: the "
                                        "larger of 10 minutes and three median epoch times")


def _s3_uri(value: str) -> str:
    from trainer.contract.layout import parse_s3_uri

    parse_s3_uri(value)  # ValueError names it
    return value.rstrip("/")


class StorageConfig(_Section):
    s3_uri: Annotated[str, AfterValidator(_s3_uri), AfterValidator(_no_credentials)] = Field(
        description="s3://bucket/prefix: each run's committed epochs are mirrored to <s3_uri>/runs/<run id>/, and "
        "runs, logs and downloads work from there when the machine is gone")
    endpoint_url: Annotated[str | None, AfterValidator(_no_credentials)] = Field(
        None, description="an S3-compatible endpoint (tests use moto's server)")
    region: str | None = Field(None, description="the bucket's region (default: ec2.region)")
    profile: str | None = Field(None, description="AWS profile orch reads the bucket with on this computer (default: "
                                "ec2.profile); the machine uses its own credentials (instance role, AWS config)")


def _webhook(value: Any) -> Any:
    return notify_contract.check_webhook(value) if isinstance(value, str) else value


# A webhook URL is a credential: shown (`orch config check`, deploy.json) as its scheme and host only.
Webhook = Annotated[SecretStr, BeforeValidator(_webhook),
                    PlainSerializer(lambda s: notify_contract.redact(s.get_secret_value()), return_type=str)]
NotifyEvent = Literal[notify_contract.EVENTS]  # type: ignore[valid-type]


class NotifyConfig(_Section):
    """A message when a run ends, sent from the machine (it arrives with the laptop closed)."""

    webhook: Webhook = Field(description="the http(s) URL a JSON message is POSTed to (a Slack incoming webhook "
                             "works as it is: it shows the message's `text`); kept out of logs, run folders and "
                             "output, which show its host only")
    on: list[NotifyEvent] = Field(default_factory=lambda: list(notify_contract.EVENTS), min_length=1,
                                  description="the events that send one: finished, failed, interrupted (a spot "
                                  "notice), recovered (a run continued after a recovery)")

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, values: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean true, as GitHub Actions users know
        if isinstance(values, dict) and True in values and "on" not in values:
            values = {("on" if k is True else k): v for k, v in values.items()}
        return values

    @model_validator(mode="after")
    def _once_each(self) -> NotifyConfig:
        self.on = list(dict.fromkeys(self.on))
        return self


class DataConfig(_Section):
    remote_dir: str = Field("models/wav2vec",
                            description="feature folder on the machine: relative to remote.root, or absolute")
    local_dir: str | None = Field(None, description="local feature folder that `orch deploy --sync-data` uploads")


def _option_field(option: trainer_options.Option) -> Any:
    """One `train:` key, typed and described by the trainer's own options table."""
    kind: Any = Literal[option.choices] if option.choices else option.type  # type: ignore[valid-type]
    if option.default is None:
        kind = kind | None
    limits = {k: getattr(option, k) for k in ("ge", "gt", "le", "lt") if getattr(option, k) is not None}

    def check(value: Any) -> Any:
        try:
            return option.validate(value)
        except trainer_options.OptionError as exc:
            raise ValueError(str(exc).removeprefix(f"{option.name}: ")) from None

    return Annotated[kind, BeforeValidator(check), Field(option.default, description=option.help, **limits)]


def _reject_orch_keys(values: Any) -> Any:
    for key in ("data_dir", "run_dir", "init_from"):
        if isinstance(values, dict) and key in values:
            raise ValueError(f"{key}: set by orch itself (data.remote_dir, the run, `orch resume`), remove it")
    return values


# deploy.yaml's `train:` section: generated from trainer/contract/options.py, the one declaration.
TrainOptions: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "TrainOptions",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Defaults for `python -m trainer train` (each run's `orch deploy -- --option X` wins).",
    __validators__={"orch_keys": model_validator(mode="before")(_reject_orch_keys)},
    **{o.name: _option_field(o) for o in trainer_options.OPTIONS if o.in_yaml},
)


class DeployConfig(_Section):
    target: Literal["ec2", "ssh", "local"] = Field("ec2", description="where training runs")
    ec2: Ec2Config = Field(default_factory=Ec2Config)
    ssh: SshConfig = Field(default_factory=SshConfig)
    remote: RemoteConfig = Field(default_factory=RemoteConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    autostop: AutostopConfig = Field(default_factory=AutostopConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig, description="recovery of a run whose machine "
                                   "was taken (`orch deploy --recover`, `orch watch`)")
    storage: StorageConfig | None = Field(None, description="an S3 mirror of every run (null: runs live only on "
                                          "the machine's disk)")
    notify: NotifyConfig | None = Field(None, description="a webhook told when a run ends (null: none); `orch "
                                        "notify test` sends a test message")
    train: TrainOptions = Field(  # type: ignore[valid-type]
        default_factory=TrainOptions,
        description="defaults for `python -m trainer train` (every key, its type, range and default: "
        "`orch config schema`); `orch deploy -- --epochs 50` overrides one run",
    )
    # Not a key of the file: where it was read from, to resolve relative local paths.
    base_dir: Path = Field(default=Path("."), exclude=True, description="folder of the config file")

    @model_validator(mode="after")
    def _check_target(self) -> DeployConfig:
        if self.target == "ssh" and not self.ssh.host:
            raise ValueError("ssh.host: required when target is ssh")
        if self.target == "ec2" and not (self.ec2.instance_id or self.ec2.name):
            raise ValueError("ec2: give instance_id or name when target is ec2")
        if self.ec2.instance_id and self.ec2.name:
            raise ValueError("ec2: give instance_id or name, not both")
        return self

    def train_given(self) -> dict[str, Any]:
        """The `train:` keys the file sets (defaults left to the trainer and its extension recipe)."""
        return self.train.model_dump(exclude_unset=True)

    def local_path(self, path: str) -> Path:
        """A local path from the file, relative to the file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def remote_root(self) -> str:
        """remote.root; for target local, made absolute against the config file's folder."""
        if self.target == "local" and not self.remote.root.startswith("~"):
            return str(self.local_path(self.remote.root).resolve())
        return self.remote.root.rstrip("/") or "/"

    @property
    def helper_python(self) -> str:
        """Runs orch's pure-Python helpers on the machine (probe, launch, sync, env set-up)."""
        if self.remote.python:
            return self.remote.python
        return sys.executable if self.target == "local" else self.remote.env.base_python

    @property
    def managed_env(self) -> bool:
        """Whether training runs in a virtualenv orch builds on the machine."""
        if self.remote.python or self.remote.env.mode == "off":
            return False
        return self.remote.env.mode == "managed" or self.target != "local"

    @property
    def remote_data_dir(self) -> str:
        d = self.data.remote_dir
        if d.startswith(("/", "~")):
            return d
        return f"{self.remote_root}/{d}"


def load_config(path: str | Path) -> DeployConfig:
    """Read and validate deploy.yaml; every problem is one line naming the file and key."""
    from orchestrator.yamlfile import read_yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file; copy the commented deploy.yaml from the orch repository "
                          "or pass -c PATH")
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (target, ec2, ssh, ...)")
    try:
        return DeployConfig.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_problem(exc, DeployConfig)}") from exc


def first_problem(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first of ``exc``'s problems as one line naming its key (a misspelt key: the nearest
    one ``model`` knows there)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != "base_dir")
    if err["type"] == "missing":
        msg = "field required"
    elif err["type"] == "extra_forbidden":
        schema = " (see `orch config schema`)" if model is DeployConfig else ""
        msg = "unknown key" + _did_you_mean(model, err["loc"]) + schema
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if loc and re.match(r"^[a-z_]+: ", msg):  # a section's validator naming one of its keys
            loc, msg = f"{loc}.{msg.split(': ', 1)[0]}", msg.split(": ", 1)[1]
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def _did_you_mean(model: Any, loc: tuple[Any, ...]) -> str:
    """' (did you mean epochs?)' for a misspelt key, from the names its section knows."""
    import difflib

    keyed = False  # the part before was a mapping of names to sections (a sweep's space:)
    for part in loc[:-1]:
        if not keyed:
            model = model.model_fields[part].annotation if part in model.model_fields else None
        keyed = typing.get_origin(model) is dict
        # an optional section (ec2.launch) is `Section | None`, a mapping `dict[str, Section]`: its section
        model = next((a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)), model)
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def json_schema() -> dict[str, Any]:
    schema = DeployConfig.model_json_schema()
    schema.get("properties", {}).pop("base_dir", None)
    return schema
