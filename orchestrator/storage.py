"""Runs as the storage mirror holds them (deploy.yaml `storage:`): read with this computer's
credentials, without the machine, so `orch runs`, `logs` and `download` work when the
instance is stopped, terminated or unreachable, or the run folder is gone.

The trainer writes the mirror (trainer/ml/mirror.py; the object layout: trainer/contract/layout.py).
What comes from S3 is untrusted exactly like what comes from the machine: run ids checked,
sizes bounded, every downloaded file verified against the run's manifest (orchestrator/download.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.config import DeployConfig
from orchestrator.context import Context
from orchestrator.errors import AwsError, ConfigError, ConnectError, InstanceStopped, NoSuchRun
from orchestrator.machine import Machine, check_run_id, choose
from orchestrator.provision import acquire
from trainer.contract import layout
from trainer.contract.wire import IN_STORAGE, MAX_FILE_SIZE, RunFiles, RunInfo, WireError, run_fields

# Every S3 action orch and the trainer call: README's storage policy lists exactly these, and a test
# checks both against the calls here and in trainer/ml/mirror.py (multipart uploads are PutObject).
IAM_ACTIONS = ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject")
MAX_SMALL = 1 << 20  # status.json, run.json, the manifest: never more than this is read


class Storage:
    """One bucket prefix of run mirrors."""

    def __init__(self, cfg: DeployConfig) -> None:
        assert cfg.storage is not None
        self.cfg, self.uri = cfg, cfg.storage.s3_uri
        self.where = self.uri  # as a download source
        self.bucket, self.prefix = layout.parse_s3_uri(cfg.storage.s3_uri)

    @cached_property
    def s3(self) -> Any:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        storage = self.cfg.storage
        assert storage is not None
        try:
            session = boto3.session.Session(profile_name=storage.profile or self.cfg.ec2.profile,
                                            region_name=storage.region or self.cfg.ec2.region)
            return session.client("s3", endpoint_url=storage.endpoint_url,
                                  config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5,
                                                read_timeout=30))
        except (BotoCoreError, ValueError) as exc:
            raise AwsError(f"storage: {exc}; check storage.profile and storage.region") from exc

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise AwsError(f"storage {self.uri}: {what}: {error.get('Code', '')} {error.get('Message', '')}".strip()) \
                from exc
        except BotoCoreError as exc:
            raise AwsError(f"storage {self.uri}: {what}: {exc}") from exc

    def _key(self, run_id: str, rel: str = "") -> str:
        return layout.storage_run_prefix(self.prefix, run_id) + rel

    def run_ids(self) -> list[str]:
        """The runs the mirror holds (ids that are not valid run ids are left out: never a path)."""
        top = layout.storage_run_prefix(self.prefix, "")  # ".../runs/": each run is a common prefix below
        ids = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=top, Delimiter="/")
        with contextlib.suppress(StopIteration):
            for page in self._call("listing runs", lambda: list(pages)):
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(top):].strip("/")
                    with contextlib.suppress(ConfigError):
                        ids.append(check_run_id(name))
        return ids

    def objects(self, run_id: str) -> dict[str, int]:
        """``{relative path: size}`` of one run's objects."""
        prefix = self._key(run_id)
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"][len(prefix):]: o["Size"] for page in self._call(f"listing run {run_id}", lambda: list(pages))
                for o in page.get("Contents", []) if 0 <= o["Size"] < MAX_FILE_SIZE}

    def read_small(self, run_id: str, rel: str) -> bytes | None:
        """A small object (at most MAX_SMALL bytes read), or None when there is none."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(run_id, rel))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise AwsError(f"storage {self.uri}: reading {run_id}/{rel}: {exc}") from exc
        except BotoCoreError as exc:  # no connection, a timeout
            raise AwsError(f"storage {self.uri}: reading {run_id}/{rel}: {exc}") from exc
        return self._call(f"reading {run_id}/{rel}", body.read, amt=MAX_SMALL)

    def _json(self, run_id: str, rel: str) -> dict[str, Any]:
        data = self.read_small(run_id, rel)
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def run(self, run_id: str) -> RunInfo:
        """One run from its mirrored status.json and run.json (checked like the machine's answers)."""
        info = {**run_fields(run_id, self._json(run_id, layout.STATUS), self._json(run_id, layout.RUN_JSON)),
                "where": IN_STORAGE}
        try:
            return RunInfo.from_json(info)
        except WireError:
            return RunInfo(run_id, where=IN_STORAGE)

    def runs(self, skip: frozenset[str] = frozenset()) -> list[RunInfo]:
        """The mirrored runs (those in ``skip`` as bare records, unread: each run costs two reads)."""
        return [RunInfo(r, where=IN_STORAGE) if r in skip else self.run(r) for r in self.run_ids()]

    def choose(self, run_id: str | None, *, best: bool = False) -> RunInfo:
        """Like Machine.choose, over the mirror; a full run id reads that run alone."""
        ids = self.run_ids()
        if run_id is not None and run_id in ids:
            return self.run(run_id)
        return choose([self.run(r) for r in ids], run_id, self.uri, best=best)

    def files(self, run_id: str) -> RunFiles:
        """The run as `orch download` reads it: the mirrored manifest and every object's size."""
        objects = self.objects(run_id)
        if not objects:
            return RunFiles()
        manifest = self.read_small(run_id, layout.MANIFEST)
        text = manifest.decode(errors="replace") if manifest is not None and len(manifest) < MAX_SMALL else None
        return RunFiles(text, objects, False, self.run(run_id))

    def fetch(self, run_id: str, rel: str, local: Path, progress: Callable[[int], None] | None = None,
              size: int | None = None) -> str:
        """One object into ``local`` (at most ``size`` bytes); returns the sha256 of what was written."""
        body = self._call(f"reading {run_id}/{rel}", self.s3.get_object, Bucket=self.bucket,
                          Key=self._key(run_id, rel))["Body"]
        h, done, limit = hashlib.sha256(), 0, size if size is not None else MAX_FILE_SIZE
        with open(local, "wb") as out:
            while block := self._call(f"reading {run_id}/{rel}", body.read, amt=min(1 << 20, limit - done + 1)):
                done += len(block)
                if done > limit:
                    raise AwsError(f"storage {self.uri}: {run_id}/{rel} is bigger than the {limit} bytes listed")
                h.update(block)
                out.write(block)
                if progress is not None:
                    progress(done)
        return h.hexdigest()

    def remove(self, run_id: str) -> int:
        """Delete the run's mirror (`orch rm --storage`); returns how many objects it had. Its
        committed state goes first: whatever a failure leaves is never taken for a run to restore."""
        keys = sorted(self._key(run_id, rel) for rel in self.objects(run_id))
        state = self._key(run_id, layout.STATE)
        batches = [[state]] if state in keys else []
        rest = [k for k in keys if k != state]
        batches += [rest[i:i + 1000] for i in range(0, len(rest), 1000)]  # DeleteObjects takes 1000 at most
        for batch in batches:
            got = self._call(f"removing run {run_id}", self.s3.delete_objects, Bucket=self.bucket,
                             Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if got.get("Errors"):
                first = got["Errors"][0]
                raise AwsError(f"storage {self.uri}: removing run {run_id}: {first.get('Code', '')} "
                               f"{first.get('Message', '')} ({len(got['Errors'])} objects left)".strip())
        return len(keys)

    def stream(self, run_id: str, rel: str, sink: Callable[[bytes], None]) -> None:
        """An object, chunk by chunk (train.log: `orch logs` of a mirrored run)."""
        if rel not in self.objects(run_id):
            raise NoSuchRun(f"run {run_id} has no {rel} in {self.uri}")
        body = self._call(f"reading {run_id}/{rel}", self.s3.get_object, Bucket=self.bucket,
                          Key=self._key(run_id, rel))["Body"]
        while block := self._call(f"reading {run_id}/{rel}", body.read, amt=1 << 20):
            sink(block)


T = TypeVar("T")
# The machine cannot answer (a stopped or terminated instance, no connection) or lacks the run:
# what storage holds answers instead.
CANNOT_ANSWER = (InstanceStopped, ConnectError, AwsError)


def machine_or_storage(ctx: Context, on_machine: Callable[[Machine], T], on_storage: Callable[[Storage], T]) -> T:
    """``on_machine(machine)``; with a storage mirror, ``on_storage(storage)`` when the machine
    cannot be reached or does not have the run. Nothing is ever started for it."""
    store = storage(ctx.cfg)
    try:
        with acquire(ctx) as m:
            return on_machine(m)
    except (*CANNOT_ANSWER, NoSuchRun) as exc:
        if store is None:
            raise
        if not isinstance(exc, NoSuchRun):
            ctx.log(f"the machine cannot be reached ({exc}); reading {store.uri}")
        return on_storage(store)


def storage(cfg: DeployConfig) -> Storage | None:
    """The configured storage mirror, or None."""
    return Storage(cfg) if cfg.storage is not None else None


def trainer_args(cfg: DeployConfig) -> list[str]:
    """The trainer's --mirror-* options for deploy.yaml's `storage:` (none without one)."""
    if cfg.storage is None:
        return []
    args = ["--mirror-uri", cfg.storage.s3_uri, "--mirror-region", cfg.storage.region or cfg.ec2.region]
    return args + (["--mirror-endpoint-url", cfg.storage.endpoint_url] if cfg.storage.endpoint_url else [])
