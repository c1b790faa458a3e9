"""Real servers on 127.0.0.1: an OpenSSH sshd with throw-away keys, and moto's EC2 server.

Every test here runs with HOME pointing at a temporary folder and no AWS variables of the
user's, so nothing can touch the real ~/.ssh or ~/.aws.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.servers import Sshd, free_port, keygen, start_sshd

__all__ = ["SpotMarket", "Sshd", "keygen", "on_a_terminal", "run_orch", "write_config"]


@pytest.fixture(scope="session", autouse=True)
def no_watcher_outlives_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The machine-side watchers the tests' launches start (autostop, spot notices) are detached
    by design: at the end, every one whose remote.root lies under this session's temp folders
    is ended (its setting may still be armed: nothing else would)."""
    yield
    import signal

    base = str(tmp_path_factory.getbasetemp())
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "trainer.machine" in words and "watch" in words and any(w.startswith(base) for w in words):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(proc.name), signal.SIGTERM)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
    return home


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def aws_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A loopback sshd whose sessions have dummy AWS credentials (the machine's own, as an
    instance role gives them: a trainer mirroring to moto's S3 needs some) and AWS config files
    of their own: never the real ~/.aws of this user."""
    d = tmp_path_factory.mktemp("aws-sshd")
    env = (f"AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_CONFIG_FILE={d}/aws-config "
           f"AWS_SHARED_CREDENTIALS_FILE={d}/aws-credentials")
    with start_sshd(d / "sshd", extra_config=f"SetEnv {env}") as server:
        yield server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for moto (never real ones)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def console_fingerprints(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make moto's canned console output carry the block cloud-init prints on a real instance
    (moto's server runs in this process; orch, in its own, asks it)."""
    import moto.ec2.responses.general as general

    def set_fingerprints(*fingerprints: str) -> None:
        block = "".join(f"256 {fp} root@ip-10-0-0-1 (ED25519)\n" for fp in fingerprints)
        monkeypatch.setattr(general, "SAMPLE_CONSOLE_OUTPUT", general.SAMPLE_CONSOLE_OUTPUT
                            + f"-----BEGIN SSH HOST KEY FINGERPRINTS-----\n{block}-----END SSH HOST KEY FINGERPRINTS-----\n")

    return set_fingerprints


def write_config(path: Path, **sections: object) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_orch(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`orch ...` as a real process (so a deploy's SSH session really ends with it)."""
    from tests.integration.trainer_proc import trainer_env

    return subprocess.run([sys.executable, "-m", "orchestrator", *map(str, args)], capture_output=True, text=True,
                          env=trainer_env(), cwd=cwd, timeout=timeout)


def on_a_terminal(*args: str | Path, question: bytes, answer: bytes) -> tuple[int, bytes]:
    """`orch ...` with a terminal for stdin and output: waits for ``question``, types ``answer``;
    returns the exit code and what the terminal showed."""
    import pty
    import select
    import time

    from tests.integration.trainer_proc import trainer_env

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *map(str, args)], stdin=slave, stdout=slave,
                            stderr=slave, env=trainer_env())
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120  # a safety net for a hang, not a margin: the loop ends on the question
    try:
        while question not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 4096)
        assert question in seen, seen.decode(errors="replace")
        os.write(master, answer)
        code = proc.wait(timeout=120)
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
        return code, seen
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@dataclass
class SpotMarket:
    """What moto's RunInstances was asked (each call's InstanceMarketOptions, {} for on-demand),
    and the error code it refuses a market with ("spot", "on-demand"), as EC2 does: HTTP 500."""

    asked: list[dict] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def spot_market(monkeypatch: pytest.MonkeyPatch) -> SpotMarket:
    """moto's RunInstances (its server runs in this process), recording what it is asked and
    refusing what the test says. moto makes a spot instance from InstanceMarketOptions but no
    spot request: one is made for it here (a real moto SpotInstanceRequest, that Describe- and
    CancelSpotInstanceRequests see), and DescribeInstances names it, as EC2 does."""
    from moto.ec2.models.spot_requests import SpotInstanceRequest
    from moto.ec2.responses.instances import InstanceResponse
    from moto.ec2.utils import random_spot_request_id

    market = SpotMarket()
    original = InstanceResponse.run_instances

    class Adopted(SpotInstanceRequest):
        """The request of an instance moto already made (a plain one launches its own)."""

        def __init__(self, instance: object, options: dict) -> None:
            self.adopted = instance
            spot = options.get("SpotOptions") or {}
            super().__init__(
                instance.ec2_backend, random_spot_request_id(), spot.get("MaxPrice"), instance.image_id,
                spot.get("SpotInstanceType", "one-time"), None, None, None, None, instance.key_name, [], None,
                instance.instance_type, None, None, None, False, instance.subnet_id, {}, None,
                spot.get("InstanceInterruptionBehavior"))

        def launch_instance(self) -> object:
            return self.adopted

    def run_instances(self: InstanceResponse) -> object:
        options = self._get_param("InstanceMarketOptions") or {}
        market.asked.append(options)
        code = market.refuse.get(options.get("MarketType", "on-demand"))
        if code:
            return (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>"
                    f"<Message>There is no capacity for your request ({code}, a test).</Message></Error></Errors>"
                    "<RequestID>refused</RequestID></Response>"), {"status": 500}
        result = original(self)
        if options.get("MarketType") == "spot":
            [instance] = result.result.instances
            request = Adopted(instance, options)
            instance.ec2_backend.spot_instance_requests[request.id] = request
            instance.spot_instance_request_id = request.id
        return result

    monkeypatch.setattr(InstanceResponse, "run_instances", run_instances)
    return market
