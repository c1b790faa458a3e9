"""The spot day, against real parts: moto's EC2 and S3 servers, the loopback sshd, and an IMDSv2
stand-in on 127.0.0.1. `orch deploy --recover` on a spot instance; EC2 sends a notice; the
machine's watcher has the trainer commit and upload inside the window; EC2 takes the
instance; orch asks EC2 (never one failed SSH probe), replaces or restarts it, restores and
continues the run, which ends exactly as an uninterrupted run. Variants: a stopped instance
started again after a capacity refusal, a budget that runs out, SSH failing while EC2 says
running, a trainer crash restarted only as often as allowed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Sshd, run_orch, write_config
from tests.integration.fault_harness import make_data, untimed
from tests.integration.test_ec2_launch import alive, an_image, aws, named, state_of
from tests.integration.test_storage import PREFIX, S3
from tests.integration.trainer_proc import metrics, start_trainer, status, trainer_env
from tests.servers import TcpRelay, imds_stand_in
from trainer.contract import layout, options
from trainer.machine.locks import holders, is_locked
from trainer.machine.proc import pid_alive
from trainer.machine.readers import read_json

pytestmark = pytest.mark.slow
# Enough epochs that the run still trains when the watcher (every 5 s) passes the notice on.
TRAIN = {"epochs": 24, "learning_rate": 0.003, "warmup_epochs": 2, "hidden": 16, "attention": 8, "batch_size": 16,
         "seed": 1, "patience": 0}
WAIT = 300.0  # a safety net for a hang, never a margin: every wait ends on an event


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("spot-data") / "data")


# The runs that end by an event (a second preemption, a second crash), never by their last epoch.
ENDLESS = {**TRAIN, "epochs": 500}


class Reference:
    """The uninterrupted run, trained in the background while the test waits on orch (its
    metrics, but wall-clock fields, are read at the end)."""

    def __init__(self, data: Path, where: Path) -> None:
        self.run = where / "reference"
        self.proc = start_trainer("train", "--data-dir", data, "--run-dir", self.run, *options.to_argv(TRAIN),
                                  log=where / "reference.log")
        STARTED.append(self.proc)

    def rows(self) -> list[dict[str, Any]]:
        assert self.proc.wait(timeout=WAIT) == 0, (self.run.parent / "reference.log").read_text()[-3000:]
        return untimed(metrics(self.run))


@pytest.fixture
def imds() -> Iterator[Any]:
    with imds_stand_in() as server:
        yield server


def wait_for(predicate: Callable[[], Any], what: str, orch: Orch | None = None) -> Any:
    """Until ``predicate`` holds; ``orch`` exiting first fails, with the end of what it said."""
    deadline = time.monotonic() + WAIT
    while not (got := predicate()):
        if orch is not None and orch.proc.poll() is not None:
            said = orch.err.read_text(errors="replace")[-3000:]
            raise AssertionError(f"orch exited ({orch.proc.returncode}) while waiting for {what}\n{said}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {WAIT:.0f} s")
        time.sleep(0.1)
    return got


STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def nothing_left_running(tmp_path: Path) -> Iterator[None]:
    """Whatever a test ends with (a failed assertion included): no orch, trainer or watcher of
    it left running."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    root = tmp_path / "remote"
    for name in (layout.SPOT_SETTING, layout.AUTOSTOP_SETTING):  # the watcher exits without either
        (root / name).unlink(missing_ok=True)
    for pid_file in root.glob(f"{layout.RUNS_DIR}/*/{layout.PID_FILE}"):
        pid, alive = pid_alive(pid_file)
        if alive and pid is not None:
            os.kill(pid, signal.SIGKILL)


class Orch:
    """`orch ...` in the background, its stdout and stderr in files."""

    def __init__(self, tmp_path: Path, *args: str | Path) -> None:
        self.out, self.err = tmp_path / "orch.out", tmp_path / "orch.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *map(str, args)], stdout=out,
                                         stderr=err, env=trainer_env())
        STARTED.append(self.proc)

    def said(self, text: str) -> int:
        return self.err.read_text(errors="replace").count(text)

    def wait_said(self, text: str, times: int = 1) -> None:
        wait_for(lambda: self.said(text) >= times, f"orch saying {text!r}", self)

    def finish(self) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout=WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code, self.out.read_text(errors="replace"), self.err.read_text(errors="replace")


def ec2_backend() -> Any:
    from moto.ec2.models import ec2_backends

    return ec2_backends["123456789012"]["us-east-1"]


def taken_by_ec2(endpoint: str, instance_id: str, how: str) -> None:
    """What EC2 does when it takes a spot instance back: stops or terminates it, saying why."""
    from moto.ec2.models.instances import StateReason

    client = aws(endpoint)
    if how == "stop":
        client.stop_instances(InstanceIds=[instance_id])
        code = "Server.SpotInstanceShutdown"
    else:
        client.terminate_instances(InstanceIds=[instance_id])
        code = "Server.SpotInstanceTermination"
    ec2_backend().get_instance(instance_id).state_reason = StateReason(f"{code}: Spot instance interruption", code)


@pytest.fixture
def refuse_starts(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """EC2 refuses the next n StartInstances for want of capacity."""
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.instances import InstanceBackend

    left = [0]
    real = InstanceBackend.start_instances

    def start_instances(self: Any, instance_ids: list[str]) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise EC2ClientError("InsufficientInstanceCapacity", "There is no Spot capacity available that matches "
                                 "your request.")
        return real(self, instance_ids)

    monkeypatch.setattr(InstanceBackend, "start_instances", start_instances)
    return lambda n: left.__setitem__(0, n)


def config(tmp_path: Path, sshd: Sshd, data: Path, moto: str, imds_url: str, *, ec2: dict, port: int | None = None,
           recover: dict | None = None, train: dict = TRAIN, **sections: object) -> Path:
    return write_config(
        tmp_path / "deploy.yaml", target="ec2",
        ec2={"region": "us-east-1", "endpoint_url": moto, "metadata_url": imds_url, **ec2},
        ssh={"host": "127.0.0.1", "port": port or sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(sshd.client_key), "known_hosts": str(tmp_path / "known_hosts")},
        remote={"root": str(tmp_path / "remote"), "python": sys.executable},
        # the data lives under remote.root: a terminated instance's disk takes it along
        data={"remote_dir": "data", "local_dir": str(data)},
        recover={"poll_seconds": 0.5, "backoff_seconds": 1, **(recover or {})}, train=train, **sections)


def spot_launch(endpoint: str, interruption: str) -> dict:
    return {"instance_type": "g4dn.xlarge", "ami": an_image(endpoint), "spot": {"interruption": interruption}}


def committed(run: Path) -> dict[str, Any]:
    path = run / layout.STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def stored_epoch(s3: S3, run_id: str) -> int | None:
    """The committed epoch of the state S3 holds (read alone: the mirror deletes superseded
    objects while a run trains, so a listing may name one that is gone when read)."""
    key = layout.storage_run_prefix(PREFIX, run_id) + layout.STATE
    try:
        return json.loads(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())["epoch"]
    except s3.client.exceptions.NoSuchKey:
        return None


def the_instance_is_gone(remote: Path) -> None:
    """What a terminated instance takes with it: its processes (here, the machine's watcher, which
    would write into a disk being removed), then its disk."""
    for pid in holders(remote / layout.WATCHER_LOCK) or []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not is_locked(remote / layout.WATCHER_LOCK), "the old instance's watcher to die")
    shutil.rmtree(remote)


def trainer_gone(run: Path) -> bool:
    return not pid_alive(run / layout.PID_FILE)[1]


def test_the_spot_day_a_notice_a_terminated_instance_a_new_one_and_an_exact_finish(
        tmp_path: Path, aws_sshd: Sshd, data: Path, moto_endpoint: str,
        aws_creds: None, console_fingerprints: Callable, imds: Any, spot_market: Any) -> None:
    sshd = aws_sshd  # the machine's trainer mirrors to S3 with credentials of its own
    reference = Reference(data, tmp_path)
    s3 = S3()
    try:
        console_fingerprints(sshd.host_fingerprint)  # each new instance's key is trusted from its console only
        name = f"spot-{tmp_path.name}"
        cfg = config(tmp_path, sshd, data, moto_endpoint, imds.url,
                     ec2={"name": name, "launch": spot_launch(moto_endpoint, "terminate")},
                     storage={"s3_uri": s3.uri, "endpoint_url": s3.endpoint, "region": "us-east-1"})
        orch = Orch(tmp_path, "deploy", "--sync-data", "--recover", "--allow-cpu", "--run-id", "spotday", "-c", cfg)
        run = tmp_path / "remote" / layout.RUNS_DIR / "spotday"
        wait_for(lambda: len(metrics(run)) >= 3, "epoch 3", orch)
        [first] = alive(moto_endpoint, name)
        assert first["InstanceLifecycle"] == "spot"

        noticed = time.monotonic()
        imds.notice("terminate")
        wait_for(lambda: (run / layout.STATUS).is_file() and status(run)["state"] == layout.INTERRUPTED,
                 "the run interrupted", orch)
        interrupted = time.monotonic() - noticed
        at = committed(run)
        wait_for(lambda: stored_epoch(s3, "spotday") == at["epoch"], "the committed state in S3")
        uploaded = time.monotonic() - noticed
        print(f"\nspot notice -> run interrupted in {interrupted:.1f} s, its committed state (epoch {at['epoch']}) "
              f"in S3 in {uploaded:.1f} s (target 30 s, EC2's window 120 s)")
        assert uploaded < 120, "the committed state must reach storage inside EC2's 2-minute window"
        assert status(run)["interruption"]["action"] == "terminate"
        imds.clear()

        wait_for(lambda: trainer_gone(run), "the interrupted trainer to exit")
        spot_market.refuse["spot"] = "InsufficientInstanceCapacity"  # no spot capacity at first
        taken_by_ec2(moto_endpoint, first["InstanceId"], "terminate")
        the_instance_is_gone(tmp_path / "remote")
        (tmp_path / "known_hosts").write_text("")  # a new instance is a new host
        orch.wait_said("no capacity")  # refused: orch backs off and asks again
        spot_market.refuse.clear()
        code, out, err = orch.finish()
        assert code == 0, out[-3000:] + err[-3000:]

        rows = metrics(run)
        assert [r["epoch"] for r in rows] == list(range(1, TRAIN["epochs"] + 1))  # every epoch once
        assert untimed(rows) == reference.rows()  # as if never interrupted
        instances = named(moto_endpoint, name)
        assert len(instances) == 2 and first["InstanceId"] in {i["InstanceId"] for i in instances}
        [second] = [i for i in instances if i["InstanceId"] != first["InstanceId"]]
        assert second["InstanceLifecycle"] == "spot"
        assert [a.get("MarketType") for a in spot_market.asked] == ["spot"] * 3  # the refused request included
        assert alive(moto_endpoint, name) == []  # created for the run, which ended, autostop off: not left running
        [recovery] = committed(run)["recoveries"]
        assert recovery["kind"] == "preempted" and recovery["old_instance"] == first["InstanceId"]
        assert recovery["new_instance"] == second["InstanceId"] and recovery["epoch_restored"] == at["epoch"]
        assert recovery["lost_seconds"] > 0
        print(f"recovery onto a new instance: {recovery['lost_seconds']:.1f} s lost (from the notice to training again)")
        assert "finished after 1 recovery" in out
        assert "restoring run spotday from" in (run / layout.TRAIN_LOG).read_text()
        listed = json.loads(run_orch("runs", "--json", "-c", cfg).stdout)  # the machine is gone: from storage
        assert [len(r["recoveries"]) for r in listed if r["run_id"] == "spotday"] == [1]
        assert imds.tokenless_requests == 0  # IMDSv1 was never used
    finally:
        s3.stop()


def test_a_stopped_spot_instance_is_started_again_after_a_capacity_refusal_until_the_budget_is_spent(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None, console_fingerprints: Callable,
        imds: Any, refuse_starts: Callable[[int], None]) -> None:
    console_fingerprints(sshd.host_fingerprint)
    name = f"spot-stop-{tmp_path.name}"
    cfg = config(tmp_path, sshd, data, moto_endpoint, imds.url,
                 ec2={"name": name, "launch": spot_launch(moto_endpoint, "stop")}, recover={"max_recoveries": 1},
                 train=ENDLESS)
    orch = Orch(tmp_path, "deploy", "--sync-data", "--recover", "--allow-cpu", "--run-id", "spotstop", "-c", cfg)
    run = tmp_path / "remote" / layout.RUNS_DIR / "spotstop"
    root = tmp_path / "remote"
    wait_for(lambda: len(metrics(run)) >= 2, "epoch 2", orch)
    [inst] = alive(moto_endpoint, name)
    assert json.loads((root / layout.SPOT_SETTING).read_text())["metadata_url"] == imds.url
    # A rebalance recommendation is recorded and shown, nothing more.
    rebalance_at = imds.rebalance()
    wait_for(lambda: read_json(root / layout.WATCHER_STATE).get("rebalance_at"), "the rebalance recorded")
    assert status(run)["state"] == layout.RUNNING

    def taken(seen: Callable[[], None] = lambda: None) -> int:
        notice_time = imds.notice("stop")
        wait_for(lambda: status(run)["state"] == layout.INTERRUPTED, "the run interrupted", orch)
        st = status(run)
        assert st["reason"] == layout.SPOT_INTERRUPTION and st["interruption"]["notice_time"] == notice_time
        seen()
        imds.clear()
        wait_for(lambda: trainer_gone(run), "the interrupted trainer to exit")
        taken_by_ec2(moto_endpoint, inst["InstanceId"], "stop")
        return int(committed(run)["epoch"])

    def shown() -> None:  # what `orch monitor` says of an interrupted run on a spot instance
        view = run_orch("monitor", "spotstop", "-c", cfg, "--json")
        assert view.returncode == 9, view.stderr  # like a stopped run: it can continue
        doc = json.loads(view.stdout)
        assert doc["state"] == layout.INTERRUPTED and doc["interruption"]["action"] == "stop"
        assert doc["rebalance_at"] == rebalance_at
        once = " ".join(run_orch("monitor", "spotstop", "-c", cfg, "--once").stdout.split())  # unwrapped
        assert "interrupted by a spot notice (stop at" in once and f"EC2 recommends rebalancing since {rebalance_at}" \
            in once
        assert "interrupted by a spot notice (stop at" in (run / layout.TRAIN_LOG).read_text()
        assert "continue with `orch resume spotstop --continue`" in (run / layout.TRAIN_LOG).read_text()

    refuse_starts(1)
    epoch = taken(shown)
    orch.wait_said("EC2 has not started instance")  # refused once: orch waits for EC2 and asks again
    wait_for(lambda: status(run)["state"] == layout.RUNNING and len(metrics(run)) >= epoch + 2,
             "the run training again on its instance", orch)
    assert "interruption" not in status(run)  # the old notice is past (its file stays: never acted on twice)
    assert state_of(moto_endpoint, inst["InstanceId"]) == "running" and len(named(moto_endpoint, name)) == 1
    taken()  # a second preemption: max_recoveries 1 is spent
    code, out, err = orch.finish()
    assert code == 9, out[-3000:] + err[-3000:]
    assert "gave up" in out and "recover.max_recoveries" in out
    assert state_of(moto_endpoint, inst["InstanceId"]) == "stopped"  # never started again unasked
    [recovery] = committed(run)["recoveries"]
    assert recovery["kind"] == "preempted" and recovery["epoch_restored"] == epoch
    assert recovery["new_instance"] == recovery["old_instance"] == inst["InstanceId"]
    assert imds.tokenless_requests == 0


def test_a_lost_network_or_a_sleeping_laptop_is_no_preemption_and_a_crash_restarts_only_as_allowed(
        tmp_path: Path, sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None) -> None:
    ssh_relay, ec2_relay = TcpRelay(sshd.port), TcpRelay(int(moto_endpoint.rsplit(":", 1)[1]))
    try:
        iid = aws(moto_endpoint).run_instances(ImageId=an_image(moto_endpoint), InstanceType="g5.xlarge", MinCount=1,
                                               MaxCount=1)["Instances"][0]["InstanceId"]
        kind, key = sshd.host_key_pub.split()[:2]
        (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{ssh_relay.port} {kind} {key}\n")
        cfg = config(tmp_path, sshd, data, f"http://127.0.0.1:{ec2_relay.port}", "http://127.0.0.1:9",
                     ec2={"instance_id": iid}, port=ssh_relay.port, recover={"max_restarts_on_errors": 1},
                     train=ENDLESS)
        deployed = run_orch("deploy", "--sync-data", "--allow-cpu", "--run-id", "crashy", "-c", cfg)
        assert deployed.returncode == 0, deployed.stderr
        orch = Orch(tmp_path, "watch", "crashy", "-c", cfg)  # a run already going
        run = tmp_path / "remote" / layout.RUNS_DIR / "crashy"
        wait_for(lambda: len(metrics(run)) >= 2, "epoch 2", orch)

        def goes_on() -> None:
            before = len(metrics(run))
            wait_for(lambda: len(metrics(run)) > before, "the run going on", orch)

        ssh_relay.cut()  # the machine stops answering SSH; EC2 still says running
        orch.wait_said("does not answer")
        wait_for(lambda: ssh_relay.refused >= 3, "three refused looks", orch)
        ec2_relay.cut()  # and then the laptop loses its network altogether
        orch.wait_said("EC2 cannot be asked")
        wait_for(lambda: ec2_relay.refused >= 3, "three refused questions", orch)
        ssh_relay.mend()
        ec2_relay.mend()
        goes_on()
        os.kill(orch.proc.pid, signal.SIGSTOP)  # the laptop sleeps while the run trains on
        goes_on()
        os.kill(orch.proc.pid, signal.SIGCONT)
        goes_on()
        assert orch.said("recovering") == 0

        def crash() -> None:
            pid = pid_alive(run / layout.PID_FILE)[0]
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: trainer_gone(run), "the trainer to die")

        crash()
        died_at = len(metrics(run))
        orch.wait_said("restart 1 of 1")
        wait_for(lambda: not trainer_gone(run) and len(metrics(run)) > died_at, "the restarted trainer's next epoch",
                 orch)
        crash()  # a second failure: no restart left
        died_at = len(metrics(run))
        code, out, err = orch.finish()
        assert code == 10, out[-3000:] + err[-3000:]
        assert orch.said("restart 2") == 0 and len(metrics(run)) == died_at
        [recovery] = committed(run)["recoveries"]
        assert recovery["kind"] == "restart" and recovery["old_instance"] == recovery["new_instance"] == iid
        assert state_of(moto_endpoint, iid) == "running"  # the user's own instance: its life is theirs
        assert "died after 1 recovery" in out
        once = " ".join(run_orch("monitor", "crashy", "-c", cfg, "--once").stdout.split())
        assert "recovered once" in once and "restart 1 of 1" in once
        table = run_orch("runs", "-c", cfg).stdout
        assert "recovered" in table and "1 recovery" in table
    finally:
        ssh_relay.close()
        ec2_relay.close()
