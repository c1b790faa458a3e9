"""Runs that outlive the machine: the trainer mirrors each committed state to S3 (moto's real
server on 127.0.0.1), S3 holds a committed state after a kill at any moment of the mirror, and
`orch runs`, `logs`, `download` and `resume --continue` work from storage once the run folder
is gone. A failing S3 never fails the run and is reported."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import run_orch, write_config
from tests.integration.fault_harness import Scenario, make_data
from tests.integration.trainer_proc import metrics, run_trainer, start_trainer, wait_for_epochs
from tests.servers import free_port
from trainer.contract import layout
from trainer.ml.mirror import FINAL_WAIT_ENV, named_files

pytestmark = pytest.mark.slow
PREFIX = "team/emotion"


class S3:
    """A moto server of our own (a test stops it), and what it holds."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = self._client()
        # moto keeps one S3 per process, whichever server: a bucket of this test's own
        self.bucket = f"orch-runs-{secrets.token_hex(4)}"
        self.uri = f"s3://{self.bucket}/{PREFIX}"
        self.client.create_bucket(Bucket=self.bucket)

    def _client(self) -> Any:
        import boto3

        return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                     region_name="us-east-1").client("s3", endpoint_url=self.endpoint)

    def mirror_args(self) -> list[str]:
        return ["--mirror-uri", self.uri, "--mirror-endpoint-url", self.endpoint, "--mirror-region", "us-east-1"]

    def objects(self, run_id: str) -> dict[str, bytes]:
        prefix = layout.storage_run_prefix(PREFIX, run_id)
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"][len(prefix):]: self.client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
                for o in listed}

    def committed_problems(self, run_id: str) -> list[str]:
        """What is wrong with S3 as a committed state of the run ([] when nothing)."""
        held = self.objects(run_id)
        sha = {rel: hashlib.sha256(data).hexdigest() for rel, data in held.items()}
        problems = []
        if layout.STATE in held:
            for rel, want in named_files(json.loads(held[layout.STATE])).items():
                if sha.get(rel) != want:
                    problems.append(f"state names {rel} ({want[:8]}), S3 has {sha.get(rel, 'nothing')[:8]}")
        if layout.MANIFEST in held:
            for rel, want in layout.parse_manifest(held[layout.MANIFEST].decode()).items():
                if sha.get(rel) != want:
                    problems.append(f"manifest lists {rel} ({want[:8]}), S3 has {sha.get(rel, 'nothing')[:8]}")
        prefix = layout.storage_run_prefix(PREFIX, run_id)
        for rel in held:
            meta = self.client.head_object(Bucket=self.bucket, Key=prefix + rel)["Metadata"].get(layout.STORAGE_SHA_KEY)
            if meta != sha[rel]:
                problems.append(f"{rel}: metadata sha256 {meta} is not its content's")
        return problems

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def s3(aws_creds: None) -> Iterator[S3]:
    server = S3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("storage-data") / "data")


def mirrored_files(run: Path) -> dict[str, bytes]:
    """What the mirror must hold of a run folder: every regular file but the machine's own."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and not p.is_symlink() and layout.is_mirrored(p.relative_to(run).as_posix())}


def test_kills_during_uploads_leave_a_committed_state_in_s3_and_the_end_matches_the_machine(
        s3: S3, data: Path, tmp_path: Path) -> None:
    scenario = Scenario(data, epochs=40)  # enough epochs that every start is killed mid-run
    run = tmp_path / "runs" / "r1"
    argv = [*scenario.argv(run), "--patience", "0", *s3.mirror_args()]  # all 40 epochs: room for every kill
    # Every point is one each pass of a mid-run start surely reaches (state, the files of a new
    # epoch, the epoch file it supersedes), but the manifest: mid-run it changes only with
    # best.weights.h5, and a plateaued run's next change is its final pass, which ends the run
    # and so leaves nothing for the later kills. Only the first start surely writes it mid-run
    # (run.json and the statistics are listed from the first epoch on).
    kills = [("mirror:manifest", 1), ("mirror:uploaded", 1), ("mirror:state", 1), ("mirror:uploaded", 2),
             ("mirror:uploaded", 4), ("mirror:deleted", 1), ("mirror:state", 2), ("mirror:uploaded", 3)]
    ends = []
    for point, n in kills:
        proc = run_trainer(*argv, check=False, env={"ORCH_TRAINER_KILL_AT": f"{point}@{n}"})
        problems = s3.committed_problems("r1")
        assert not problems, (point, n, proc.returncode, problems)
        ends.append((point, n, proc.returncode, len(metrics(run))))
        if proc.returncode == 0:  # the run finished before the point came: nothing left to kill
            break
        assert proc.returncode == -9, (point, n, proc.stdout[-2000:])
    assert sum(rc == -9 for _p, _n, rc, _e in ends) >= 5, ends  # the kills did come while uploads ran
    proc = run_trainer(*argv)
    epoch = json.loads((run / layout.STATE).read_text())["epoch"]
    assert epoch == 40
    assert f"storage: final state (epoch {epoch})" in proc.stdout and "storage: upload to" not in proc.stdout
    held = s3.objects("r1")
    assert held == mirrored_files(run)  # bit-identical, nothing the state no longer names
    assert json.loads(held[layout.STATE])["epoch"] == epoch and json.loads(held[layout.STATUS])["state"] == "finished"
    assert json.loads((run / layout.MIRROR_STATUS).read_text())["state"] == "ok"


def local_config(tmp_path: Path, root: Path, s3: S3, data: Path) -> Path:
    return write_config(tmp_path / "deploy.yaml", target="local",
                        remote={"root": str(root), "python": sys.executable}, data={"remote_dir": str(data)},
                        storage={"s3_uri": s3.uri, "endpoint_url": s3.endpoint, "region": "us-east-1"},
                        train={"epochs": 3, "learning_rate": 0.003, "warmup_epochs": 1, "hidden": 16, "attention": 8,
                               "batch_size": 16})


def test_a_run_whose_folder_is_gone_is_listed_logged_downloaded_and_continued_from_storage(
        s3: S3, data: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = root / layout.RUNS_DIR / "gone"
    run.mkdir(parents=True)
    # The machine dies right after the first committed state reached S3: what is there is all there is.
    proc = start_trainer("train", "--data-dir", data, "--run-dir", run, "--epochs", "12", "--learning-rate", "0.003",
                         "--warmup-epochs", "1", "--hidden", "16", "--attention", "8", "--batch-size", "16",
                         *s3.mirror_args(), log=run / layout.TRAIN_LOG, env={"ORCH_TRAINER_KILL_AT": "mirror:state@1"})
    assert proc.wait(timeout=600) == -9
    before = {rel: data for rel, data in s3.objects("gone").items()}
    assert layout.STATE in before, "the first epoch was never mirrored"
    shutil.rmtree(run)
    cfg = local_config(tmp_path, root, s3, data)

    listed = json.loads(run_orch("runs", "--json", "-c", cfg).stdout)
    assert [(r["run_id"], r["where"]) for r in listed] == [("gone", "storage")]
    logs = run_orch("logs", "gone", "-c", cfg)
    assert logs.returncode == 0 and logs.stdout.encode() == before[layout.TRAIN_LOG]

    dest = tmp_path / "dest"
    got = run_orch("download", "gone", "--dest", dest, "-c", cfg)
    assert got.returncode == 0, got.stderr
    for rel in layout.parse_manifest(before[layout.MANIFEST].decode()):
        assert (dest / "gone" / rel).read_bytes() == before[rel]  # verified against the manifest, bit-identical
    assert not list(dest.rglob("*.part-*"))

    resumed = run_orch("resume", "gone", "--continue", "--follow", "--allow-cpu", "-c", cfg, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (run / layout.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    assert rows[0] == json.loads(before[layout.METRICS].decode().splitlines()[0])  # epoch 1 came from storage
    log = (run / layout.TRAIN_LOG).read_text()
    assert "restoring run gone from" in log and "storage: upload to" not in log  # no pass ever failed
    assert json.loads(s3.objects("gone")[layout.STATE])["epoch"] == 12
    both = json.loads(run_orch("runs", "--json", "-c", cfg).stdout)
    assert [(r["run_id"], r["where"]) for r in both] == [("gone", "both")]


def test_a_failing_s3_never_fails_the_run_and_is_reported(s3: S3, data: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    run = root / layout.RUNS_DIR / "s3down"
    run.parent.mkdir(parents=True)
    proc = start_trainer("train", "--data-dir", data, "--run-dir", run, "--epochs", "4", "--learning-rate", "0.003",
                         "--warmup-epochs", "1", "--hidden", "16", "--attention", "8", "--batch-size", "16",
                         *s3.mirror_args(), log=run.parent / "s3down.log", env={FINAL_WAIT_ENV: "3"})
    wait_for_epochs(run, 1, proc)
    s3.stop()  # S3 goes away mid-run
    assert proc.wait(timeout=600) == 0  # the run finishes all the same
    rows = [json.loads(line) for line in (run / layout.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    report = json.loads((run / layout.MIRROR_STATUS).read_text())
    assert report["state"] == "retrying" and report["failures"] >= 1 and report["error"]
    log = (run.parent / "s3down.log").read_text()
    assert "storage: upload to" in log and "the final state did not reach" in log
    cfg = local_config(tmp_path, root, s3, data)
    shown = run_orch("runs", "--json", "-c", cfg)
    assert shown.returncode == 0 and "storage cannot be read" in shown.stderr
    assert json.loads(shown.stdout)[0]["mirror"]["state"] == "retrying"
    view = run_orch("monitor", "s3down", "--once", "-c", cfg)
    assert "uploads to s3://" in view.stdout and "failing" in view.stdout, view.stdout


@pytest.mark.parametrize("key", ["stats/../lock", "", "pid", "tensorboard/x", "checkpoints/.tmp-x", "a/b/c/d"])
def test_a_crafted_object_key_is_never_restored_and_the_run_folder_stays_as_it_was(s3: S3, tmp_path: Path,
                                                                                    key: str) -> None:
    from trainer.ml.errors import TrainerError
    from trainer.ml.mirror import Settings, restore

    prefix = layout.storage_run_prefix(PREFIX, "evil")
    for rel, body in ((layout.STATE, b'{"epoch": 0}'), (layout.RUN_JSON, b"{}"), (key, b"owned")):
        s3.client.put_object(Bucket=s3.bucket, Key=prefix + rel, Body=body,
                             Metadata={layout.STORAGE_SHA_KEY: hashlib.sha256(body).hexdigest()})
    run = tmp_path / "evil"
    run.mkdir()
    (run / layout.RUN_LOCK).write_text("mine\n")
    with pytest.raises(TrainerError, match="not a file of a run"):
        restore(run, Settings(s3.uri, s3.endpoint, "us-east-1"), lambda _msg: None)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil", layout.RUN_LOCK]
    assert (run / layout.RUN_LOCK).read_text() == "mine\n"


def test_an_unreachable_machine_leaves_runs_and_logs_readable_from_storage(s3: S3, tmp_path: Path) -> None:
    prefix = layout.storage_run_prefix(PREFIX, "20261201-101500-ab12")
    for rel, body in ((layout.STATUS, json.dumps({"state": "running", "epoch": 3, "epochs": 9}).encode()),
                      (layout.RUN_JSON, json.dumps({"started_at": "2026-12-01T10:15:00+00:00"}).encode()),
                      (layout.TRAIN_LOG, b"epoch 3 \x1b]0;owned\x07done\n")):
        s3.client.put_object(Bucket=s3.bucket, Key=prefix + rel, Body=body)
    s3.client.put_object(Bucket=s3.bucket, Key=layout.storage_run_prefix(PREFIX, "bad id!") + layout.STATUS, Body=b"{}")
    cfg = write_config(tmp_path / "deploy.yaml", target="ssh",
                       ssh={"host": "127.0.0.1", "port": free_port(), "connect_timeout": 2, "config_file": None},
                       storage={"s3_uri": s3.uri, "endpoint_url": s3.endpoint, "region": "us-east-1"})
    listed = run_orch("runs", "--json", "-c", cfg)
    assert listed.returncode == 0, listed.stderr
    assert "the machine cannot be reached" in listed.stderr and s3.uri in listed.stderr
    runs = json.loads(listed.stdout)
    assert [(r["run_id"], r["where"], r["state"], r["epoch"]) for r in runs] == [
        ("20261201-101500-ab12", "storage", "running when last mirrored", 3)]  # the crafted id is left out
    table = run_orch("runs", "-c", cfg)
    assert "where" in table.stdout and "storage" in table.stdout
    logs = run_orch("logs", "20261201", "-c", cfg)
    assert logs.returncode == 0 and "epoch 3" in logs.stdout and "\x1b" not in logs.stdout
    missing = run_orch("download", "nope", "-c", cfg, "--dest", tmp_path / "d")
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr and s3.uri in missing.stderr
