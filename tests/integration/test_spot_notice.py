"""The notice on the machine, the real flow: a spot instance (moto's EC2) reached at the loopback
sshd, runs mirrored to moto's S3, and an IMDSv2 stand-in as ec2.metadata_url. `orch deploy`
sets spot watching; at epoch 3 the test posts a terminate notice; the watcher SIGTERMs the
trainer, which commits, uploads and ends `interrupted` well inside EC2's two minutes (the
figure is measured and printed); `orch monitor` shows it, and the rebalance recommendation;
IMDS was never asked without a token; `orch resume RUN --continue` continues it exactly."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.integration.conftest import Sshd, run_orch, write_config
from tests.integration.trainer_proc import metrics, status
from tests.servers import ImdsStandIn, imds_stand_in
from trainer.contract import layout
from trainer.machine.proc import pid_alive
from trainer.machine.readers import read_json
from trainer.ml.synth import synth

pytestmark = pytest.mark.slow
TRAIN = {"epochs": 500, "batch_size": 16, "hidden": 8, "attention": 4, "seed": 1, "patience": 0}
PREFIX = "spot"
TARGET_S, WINDOW_S = 30.0, 120.0  # the issue's target; EC2's notice comes two minutes ahead


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spot-data")
    synth(root, n=60, dim=8, seed=3, min_frames=4, max_frames=6)
    return root


@pytest.fixture
def imds() -> Iterator[ImdsStandIn]:
    with imds_stand_in() as server:
        yield server


def aws(endpoint: str, service: str) -> Any:
    return boto3.client(service, region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 300) -> Any:
    """Poll until ``predicate`` is true (a safety deadline for a hang, not a margin)."""
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def test_a_spot_notice_ends_the_run_interrupted_and_committed_in_storage_inside_the_window(
        tmp_path: Path, aws_sshd: Sshd, data: Path, moto_endpoint: str, aws_creds: None, imds: ImdsStandIn,
        capsys: pytest.CaptureFixture[str]) -> None:
    ec2, s3 = aws(moto_endpoint, "ec2"), aws(moto_endpoint, "s3")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="g5.xlarge",
                            InstanceMarketOptions={"MarketType": "spot"})["Instances"][0]["InstanceId"]
    bucket = f"orch-spot-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=bucket)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(aws_sshd.known_hosts_line())
    root = tmp_path / "remote"
    cfg = write_config(
        tmp_path / "deploy.yaml", target="ec2",
        ec2={"region": "us-east-1", "endpoint_url": moto_endpoint, "instance_id": iid, "metadata_url": imds.url},
        ssh={"host": "127.0.0.1", "port": aws_sshd.port, "user": os.environ.get("USER") or "root",
             "key_file": str(aws_sshd.client_key), "known_hosts": str(known_hosts)},
        remote={"root": str(root), "python": sys.executable}, data={"remote_dir": str(data)},
        train={**TRAIN, "cache_dir": str(tmp_path / "cache")},
        storage={"s3_uri": f"s3://{bucket}/{PREFIX}", "endpoint_url": moto_endpoint, "region": "us-east-1"})

    try:
        deployed = run_orch("deploy", "-c", cfg, "--json", "--run-id", "spotty")
        assert deployed.returncode == 0, deployed.stderr
        run = Path(json.loads(deployed.stdout)["run_dir"])
        assert json.loads((root / layout.SPOT_SETTING).read_text())["metadata_url"] == imds.url
        wait_for(lambda: imds.gets(ImdsStandIn.INSTANCE_ACTION) > 0, "the watcher's first question")

        rebalance_at = imds.rebalance()
        wait_for(lambda: read_json(root / layout.WATCHER_STATE).get("rebalance_at"), "the rebalance")
        wait_for(lambda: len(metrics(run)) >= 3, "epoch 3 committed")
        assert status(run)["state"] == "running"  # nothing but a record and a line for a recommendation

        notice_time = imds.notice("terminate")
        posted, posted_wall = time.monotonic(), time.time()

        def stored_state() -> bytes | None:
            try:
                return s3.get_object(Bucket=bucket, Key=f"{PREFIX}/runs/spotty/{layout.STATE}")["Body"].read()
            except s3.exceptions.NoSuchKey:
                return None

        def interrupted_and_stored() -> bool:
            st = status(run)
            return st.get("state") == layout.INTERRUPTED and stored_state() == (run / layout.STATE).read_bytes()

        wait_for(interrupted_and_stored, "the interrupted state, committed in S3", timeout=WINDOW_S + 60)
        elapsed = time.monotonic() - posted
        st = status(run)
        with capsys.disabled():
            print(f"\nspot notice -> run interrupted and its committed state (epoch {st['epoch']}) in S3: "
                  f"{elapsed:.1f} s (target {TARGET_S:.0f} s, EC2's window {WINDOW_S:.0f} s; the watcher saw the notice "
                  f"after {st['interruption']['noticed_at'] - posted_wall:.1f} s)")
        assert elapsed < WINDOW_S
        assert st["reason"] == layout.SPOT_INTERRUPTION
        assert st["interruption"]["action"] == "terminate" and st["interruption"]["notice_time"] == notice_time
        committed = json.loads((run / layout.STATE).read_text())["epoch"]
        assert st["epoch"] == committed >= 3
        log = (run / layout.TRAIN_LOG).read_text()
        assert f"interrupted by a spot notice (terminate at {notice_time})" in log
        assert "continue with `orch resume spotty --continue`" in log
        assert "spot: EC2 gave notice" in (root / layout.WATCHER_LOG).read_text()

        view = run_orch("monitor", "spotty", "-c", cfg, "--json")
        assert view.returncode == 9, view.stderr  # like a stopped run: it can continue
        doc = json.loads(view.stdout)
        assert doc["state"] == layout.INTERRUPTED and doc["interruption"]["notice_time"] == notice_time
        assert doc["rebalance_at"] == rebalance_at
        once = " ".join(run_orch("monitor", "spotty", "-c", cfg, "--once").stdout.split())  # unwrapped
        assert f"interrupted by a spot notice (terminate at {notice_time})" in once
        assert f"EC2 recommends rebalancing since {rebalance_at}: this spot instance is at higher risk" in once
        assert imds.tokenless_requests == 0 and imds.token_requests >= 1  # IMDSv2 only, never a GET without a token

        # The same machine (the notice is withdrawn): the run continues from its committed epoch.
        imds.clear()
        resumed = run_orch("resume", "spotty", "--continue", "-c", cfg)
        assert resumed.returncode == 0, resumed.stderr
        wait_for(lambda: len(metrics(run)) >= committed + 2, "epochs after the interruption")
        stopped = run_orch("stop", "spotty", "-c", cfg)
        assert stopped.returncode == 0, stopped.stderr
        final = status(run)
        assert final["state"] == layout.STOPPED and "interruption" not in final and final["reason"] is None
        epochs = [row["epoch"] for row in metrics(run)]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= committed + 2  # each epoch once
        assert not (run / layout.INTERRUPTION).exists()  # the old notice was no notice for the continued trainer
    finally:  # no trainer or watcher left behind, whatever failed
        (root / layout.SPOT_SETTING).unlink(missing_ok=True)
        pid, alive = pid_alive(root / layout.RUNS_DIR / "spotty" / layout.PID_FILE)  # start time checked
        if alive and pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
