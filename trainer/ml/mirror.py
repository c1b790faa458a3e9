"""The storage mirror: every committed state of a run, copied to S3 beside training.

A thread of the trainer looks at the run directory about once a second; when the committed
state (or a file derived from it) changed, one *pass* copies it to
``<s3_uri>/runs/<run_id>/`` in an order that keeps what S3 holds a committed state at every
instant (trainer/contract/layout.py): the files the state names and the other files first,
``MANIFEST.sha256`` rewritten without an entry before that object changes and with it after,
``checkpoints/state.json`` last, and only then the epoch objects it no longer names deleted.
A kill at any moment leaves S3 at the last state whose pass reached its state upload.

S3 never blocks or fails training: a failing pass is retried with backoff (1 s doubling to a
minute) and reported in ``mirror.json`` (orch shows it); at the end, the final state is
uploaded before the trainer exits (waiting at most FINAL_WAIT seconds). Every object carries
its whole-file sha256 (metadata), and S3 checks each upload (boto3's ChecksumAlgorithm).

A run folder that lacks its committed state while S3 has one is restored from S3 first
(verified) and then continued: ``orch resume RUN --continue`` on a machine that lost the run.
Credentials are the machine's own (instance role, AWS config, environment): orch sends none.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.contract import layout
from trainer.contract.files import hash_stream, writing_alone
from trainer.machine import faults
from trainer.machine.fsutil import atomic_write_bytes, atomic_write_json
from trainer.ml.errors import TrainerError

Log = Callable[[str], None]
POLL = 1.0  # seconds between looks at the run directory
MAX_BACKOFF = 60.0
SNAPSHOT_IN_MEMORY = 8 << 20  # a snapshot of a file being appended to spills to a temp file past this
# How long the trainer waits, at its end, for the final state to reach S3 (a test hook lowers it).
FINAL_WAIT_ENV = "ORCH_MIRROR_FINAL_WAIT"
FINAL_WAIT = 300.0
STATE_FILES = ("file", "sha256")  # a dict of the state with both keys names one of its files


@dataclass(frozen=True)
class Settings:
    """Where a run is mirrored (the trainer's --mirror-* options)."""

    uri: str
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def pop_from(cls, given: dict[str, Any]) -> Settings | None:
        """The mirror options out of the trainer's options (they are not training settings)."""
        uri, endpoint, region = (given.pop(k, None) for k in ("mirror_uri", "mirror_endpoint_url", "mirror_region"))
        return cls(uri, endpoint, region) if uri else None


def s3_client(settings: Settings) -> Any:
    """boto3's S3 client from the machine's own credential chain, with bounded waits."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60)
    return boto3.session.Session(region_name=settings.region).client(
        "s3", endpoint_url=settings.endpoint_url, config=config)


def named_files(state: Any) -> dict[str, str]:
    """``{rel: sha256}`` of every file the committed state names (any {"file", "sha256"} in it)."""
    found: dict[str, str] = {}
    if isinstance(state, dict):
        if all(isinstance(state.get(k), str) for k in STATE_FILES):
            found[state["file"]] = state["sha256"]
        for value in state.values():
            found |= named_files(value)
    elif isinstance(state, list):
        for value in state:
            found |= named_files(value)
    return found


class Bucket:
    """One run's objects in S3, and what this process knows they hold (rel -> sha256)."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.bucket, prefix = layout.parse_s3_uri(settings.uri)
        self.prefix = layout.storage_run_prefix(prefix, run_id)
        self.s3 = s3_client(settings)
        self.held: dict[str, str] | None = None  # None: not listed yet
        self._manifest: dict[str, str] | None = None  # what S3's MANIFEST.sha256 lists

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def listing(self) -> dict[str, str]:
        """What S3 holds for the run, with each object's sha256 (its metadata)."""
        if self.held is None:
            held: dict[str, str] = {}
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    head = self.s3.head_object(Bucket=self.bucket, Key=obj["Key"])
                    held[obj["Key"][len(self.prefix):]] = head.get("Metadata", {}).get(layout.STORAGE_SHA_KEY, "")
            self.held = held
        return self.held

    def put(self, rel: str, fh: Any, sha: str) -> None:
        """Upload one file (multipart when big), checked by S3, its sha256 as metadata."""
        from boto3.s3.transfer import TransferConfig

        # boto3 closes what it uploads, and one open file may go up under two names (an epoch
        # file and best.weights.h5): it gets a descriptor of its own, at the start
        own = os.fdopen(os.dup(fh.fileno()), "rb") if isinstance(fh, io.BufferedReader) else fh
        own.seek(0)
        self.s3.upload_fileobj(own, self.bucket, self.key(rel), Config=TransferConfig(multipart_threshold=64 << 20),
                               ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {layout.STORAGE_SHA_KEY: sha}})
        self.listing()[rel] = sha
        if rel == layout.STATE:
            faults.point("mirror:state")
        elif rel == layout.MANIFEST:
            faults.point("mirror:manifest")
        else:
            faults.point("mirror:uploaded")

    @property
    def manifest(self) -> dict[str, str]:
        if self._manifest is None:
            text = self.get_bytes(layout.MANIFEST)[0] if layout.MANIFEST in self.listing() else b""
            self._manifest = layout.parse_manifest(text.decode(errors="replace"))
        return self._manifest

    def put_manifest(self, entries: dict[str, str]) -> None:
        """MANIFEST.sha256 in S3 := ``entries`` (deleted when there are none)."""
        if entries == self.manifest:
            return
        if entries:
            self.put_bytes(layout.MANIFEST, "".join(layout.manifest_line(s, r) + "\n" for r, s in entries.items())
                           .encode())
        elif layout.MANIFEST in self.listing():
            self.delete(layout.MANIFEST)
        self._manifest = dict(entries)

    def put_bytes(self, rel: str, data: bytes) -> None:
        self.put(rel, io.BytesIO(data), hashlib.sha256(data).hexdigest())

    def delete(self, rel: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key(rel))
        self.listing().pop(rel, None)
        faults.point("mirror:deleted")

    def get(self, rel: str, out: Any) -> str:
        """Download one object into ``out``; returns the sha256 of what was written."""
        body = self.s3.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"]
        return hash_stream(body, on_block=out.write).hexdigest()

    def get_bytes(self, rel: str) -> tuple[bytes, str]:
        """A small object, and the sha256 of what came."""
        buf = io.BytesIO()
        sha = self.get(rel, buf)
        return buf.getvalue(), sha


class StateMoved(Exception):
    """The run committed again while a pass read it: start the pass over with the new state."""


class Pass:
    """One copy of the run's committed state to S3 (see the module docstring for the order)."""

    def __init__(self, run_dir: Path, bucket: Bucket, hashes: dict[tuple[str, int, int], str]) -> None:
        self.run_dir, self.bucket, self.hashes = run_dir, bucket, hashes
        self.open: dict[str, tuple[Any, str]] = {}  # rel -> (open file, sha256): what this pass uploads

    def run(self) -> int | None:
        """Copy; returns the epoch of the state now in S3 (None: nothing committed yet)."""
        with contextlib.ExitStack() as stack:
            state_bytes = self._read(layout.STATE)
            state = json.loads(state_bytes) if state_bytes is not None else None
            wanted = named_files(state)
            for rel, sha in wanted.items():
                self._open(stack, rel, expect=sha)
            manifest = layout.parse_manifest(self._read(layout.MANIFEST).decode() if self._exists(layout.MANIFEST)
                                             else "")
            best = named_files(state.get("best")) if isinstance(state, dict) else {}
            for rel, sha in best.items():  # best.weights.h5 as the state says, even before it is published here
                self.open[layout.BEST_WEIGHTS] = self.open[rel]
                manifest[layout.BEST_WEIGHTS] = sha
            for rel in self._other_files():
                self._snapshot(stack, rel)
            if self._read(layout.STATE) != state_bytes:  # committed again meanwhile: its files may be newer
                raise StateMoved(layout.STATE)
            self._upload(manifest)
            if state_bytes is not None:
                self.bucket.put_bytes(layout.STATE, state_bytes)  # THE commit point in S3: last
                for rel in [r for r in self.bucket.listing() if _checkpoint_file(r) and r not in wanted]:
                    self.bucket.delete(rel)  # only now: the state in S3 no longer names it
            return state.get("epoch") if isinstance(state, dict) else None

    def _upload(self, manifest: dict[str, str]) -> None:
        held = self.bucket.listing()
        changing = {rel for rel, (_fh, sha) in self.open.items() if held.get(rel) != sha}
        # The manifest in S3 never vouches for an object while it is replaced.
        self.bucket.put_manifest({r: s for r, s in self.bucket.manifest.items() if r not in changing})
        for rel in sorted(changing, key=lambda r: r == layout.BEST_WEIGHTS):
            fh, sha = self.open[rel]
            self.bucket.put(rel, fh, sha)
        self.bucket.put_manifest({r: s for r, s in manifest.items() if held.get(r) == s})

    def _other_files(self) -> list[str]:
        """Every other regular file of the run folder worth keeping (see layout.NOT_MIRRORED)."""
        rels = []
        for path in sorted(self.run_dir.rglob("*")):
            rel = path.relative_to(self.run_dir).as_posix()
            if (not layout.is_mirrored(rel) or rel == layout.MANIFEST
                    or _checkpoint_file(rel) or rel == layout.STATE or rel in self.open or path.is_symlink()
                    or not path.is_file()):
                continue
            rels.append(rel)
        return rels

    def _exists(self, rel: str) -> bool:
        return (self.run_dir / rel).is_file()

    def _read(self, rel: str) -> bytes | None:
        try:
            return (self.run_dir / rel).read_bytes()
        except FileNotFoundError:
            return None

    def _snapshot(self, stack: contextlib.ExitStack, rel: str) -> None:
        """A file the trainer may be appending to in place (train.log, the event files): a copy of
        its bytes as of now, so that the sha256 recorded with the object is that of what goes up."""
        try:
            with open(self.run_dir / rel, "rb") as src:
                copy = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=SNAPSHOT_IN_MEMORY))  # noqa: SIM115 (closed by the stack)
                sha = hash_stream(src, on_block=copy.write).hexdigest()
        except FileNotFoundError:
            return
        copy.seek(0)
        self.open[rel] = (copy, sha)

    def _open(self, stack: contextlib.ExitStack, rel: str, expect: str) -> None:
        """Open a file the committed state names, whose sha256 it records (it stays readable if the
        trainer deletes it; such files are never changed in place)."""
        try:
            fh = stack.enter_context(open(self.run_dir / rel, "rb"))  # noqa: SIM115 (closed by the stack)
        except FileNotFoundError as exc:
            raise StateMoved(rel) from exc  # the state that named it is superseded
        st = os.fstat(fh.fileno())
        key = (rel, st.st_ino, st.st_mtime_ns)
        sha = self.hashes.get(key) or hash_stream(fh).hexdigest()
        fh.seek(0)
        if sha != expect:
            raise TrainerError(f"{rel} does not match the sha256 its committed state records: not uploaded")
        self.hashes[key] = sha
        self.open[rel] = (fh, sha)


def _checkpoint_file(rel: str) -> bool:
    """A file under checkpoints/ that only a state names (not the state, not best.weights.h5)."""
    return rel.startswith(f"{layout.CHECKPOINTS_DIR}/") and rel not in (layout.STATE, layout.BEST_WEIGHTS)


class Mirror:
    """The uploader thread of one run directory."""

    def __init__(self, run_dir: Path, settings: Settings, log: Log) -> None:
        self.run_dir, self.settings, self.log = run_dir, settings, log
        self.closing = threading.Event()
        self.report: dict[str, Any] = {"state": "starting", "uri": settings.uri, "epoch": None, "synced_at": None,
                                       "error": None, "failures": 0}
        self._bucket: Bucket | None = None
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._seen: Any = None
        self._thread = threading.Thread(target=self._loop, name="mirror", daemon=True)

    @property
    def bucket(self) -> Bucket:
        if self._bucket is None:
            self._bucket = Bucket(self.settings, self.run_dir.name)
        return self._bucket

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """The final state to S3 before the trainer exits (within FINAL_WAIT seconds)."""
        self.closing.set()
        self._thread.join()
        wait = float(os.environ.get(FINAL_WAIT_ENV, FINAL_WAIT))
        deadline, delay = time.monotonic() + wait, 1.0
        while not self._sync(force=True):
            if time.monotonic() + delay > deadline:
                self.log(f"storage: the final state did not reach {self.settings.uri}: {self.report['error']}; it "
                         "stays on this machine (`orch resume RUN --continue` uploads it again)")
                return
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF)
        self.log(f"storage: final state (epoch {self.report['epoch']}) is in {self.settings.uri}")

    def _loop(self) -> None:
        delay = POLL
        while not self.closing.wait(delay):
            delay = POLL if self._sync() else min(max(2 * delay, 1.0), MAX_BACKOFF)

    def _signature(self) -> Any:
        sig = []
        for rel in (layout.STATE, layout.MANIFEST, layout.STATUS, layout.METRICS):  # the log rides along
            with contextlib.suppress(OSError):
                st = (self.run_dir / rel).stat()
                sig.append((rel, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def _sync(self, force: bool = False) -> bool:
        """One pass when something changed; False when it failed (reported, retried later)."""
        seen = self._signature()
        if seen == self._seen and not force:
            return True
        try:
            for _ in range(5):
                try:
                    epoch = Pass(self.run_dir, self.bucket, self._hashes).run()
                    break
                except StateMoved:
                    continue
            else:
                return True  # committing faster than we copy: the next look catches up
        except Exception as exc:  # S3 down, throttled, refused: training goes on; tell and retry
            self._bucket = None  # list it again: a failed pass may have left anything
            first = self.report["failures"] == 0
            self._write_report("retrying", error=f"{type(exc).__name__}: {exc}"[:500],
                               failures=self.report["failures"] + 1)
            if first:
                self.log(f"storage: upload to {self.settings.uri} failed ({self.report['error']}); retrying, "
                         "training goes on")
            return False
        self._seen = seen
        if self.report["failures"]:
            self.log(f"storage: uploads to {self.settings.uri} work again")
        self._write_report("ok", epoch=epoch, synced_at=time.time(), error=None, failures=0)
        return True

    def _write_report(self, state: str, **fields: Any) -> None:
        self.report.update(fields, state=state, updated_at=time.time())
        with contextlib.suppress(OSError):
            atomic_write_json(self.run_dir / layout.MIRROR_STATUS, self.report)


# --------------------------------------------------------------------------- restoring


def restore(run_dir: Path, settings: Settings, log: Log) -> bool:
    """Bring a run folder that has no committed state back from S3 (every object verified
    against the state, the manifest or its own sha256), state.json last. False: S3 has none."""
    if (run_dir / layout.STATE).exists():
        return False
    bucket = Bucket(settings, run_dir.name)
    held = bucket.listing()
    if layout.STATE not in held:
        return False
    state_bytes, sha = bucket.get_bytes(layout.STATE)
    if sha != held[layout.STATE]:
        raise TrainerError(f"storage: {layout.STATE} of run {run_dir.name} does not match its checksum in S3")
    expected = {rel: sha for rel, sha in held.items() if rel != layout.STATE}
    expected |= named_files(json.loads(state_bytes))
    for rel in expected:
        _check_key(run_dir, rel)
    log(f"restoring run {run_dir.name} from {settings.uri} ({len(expected) + 1} files)")
    # Everything lands in a staging folder first, verified: a failure leaves the run folder as it was.
    staging = run_dir / f"{layout.TEMP_PREFIX}restore"
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    try:
        for rel, sha in sorted(expected.items()):
            if rel != layout.TRAIN_LOG:
                _fetch_verified(bucket, rel, sha, staging / rel, run_dir.name)
        if layout.TRAIN_LOG in expected:
            _restore_log(run_dir / layout.TRAIN_LOG, bucket, expected[layout.TRAIN_LOG])
        for rel in sorted(expected):
            if rel != layout.TRAIN_LOG:
                (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, run_dir / rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_bytes(run_dir / layout.STATE, state_bytes)  # the commit point, last
    return True


def _check_key(run_dir: Path, rel: str) -> None:
    """An object of the run may only name a plain relative path inside it, never the machine's own files."""
    parts = rel.split("/")
    if (not rel or any(p in ("", ".", "..") for p in parts) or not layout.is_mirrored(rel)
            or "\x00" in rel or len(parts) > 3):
        raise TrainerError(f"storage: run {run_dir.name} holds an object that is not a file of a run: {rel!r}")


def _fetch_verified(bucket: Bucket, rel: str, sha: str, target: Path, run_id: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        got = bucket.get(rel, out)
        out.flush()
        os.fsync(out.fileno())
    if got != sha:
        raise TrainerError(f"storage: {rel} of run {run_id} does not match its checksum "
                           f"(expected {sha[:12]}..., got {got[:12]}...)")


def _restore_log(target: Path, bucket: Bucket, sha: str) -> None:
    """The mirrored train.log, then what this start has written to it so far, in the same file."""
    stored, got = bucket.get_bytes(layout.TRAIN_LOG)
    if got != sha:
        raise TrainerError(f"storage: {layout.TRAIN_LOG} does not match its checksum")
    sys.stdout.flush()
    # Under train.log's lock: the log filter appends (O_APPEND) before or after the rewrite, never inside it.
    with open(target, "r+b") if target.exists() else open(target, "w+b") as fh, writing_alone(fh.fileno()):
        now = fh.read()
        if not now.startswith(stored):  # a restore killed before its commit left it in front already
            fh.seek(0)
            fh.write(stored + now)
            fh.flush()
            fh.truncate()
        here = os.fstat(fh.fileno())
    import fcntl

    for fd in (1, 2):  # our own output into this file goes on at its (new) end
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), here):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)


@contextlib.contextmanager
def mirroring(run_dir: Path, settings: Settings | None, log: Log) -> Iterator[None]:
    """Around a whole training run: restore a lost run from S3, mirror while it trains, upload
    the final state at the end. Nothing at all without settings."""
    if settings is None:
        yield
        return
    from trainer.ml import runlock

    runlock.hold(run_dir)  # before the restore writes anything: the run is ours
    try:
        restore(run_dir, settings, log)
    except ImportError as exc:
        raise TrainerError(f"storage: {exc}; install boto3 in the training environment") from exc
    except TrainerError:
        raise
    except Exception as exc:
        if not (run_dir / layout.STATE).exists():  # nothing committed here: training would start over
            raise TrainerError(f"storage: cannot restore run {run_dir.name} from {settings.uri} ({exc}); nothing "
                               "was changed, try again") from exc
        log(f"storage: could not reach {settings.uri} ({exc}); continuing from this machine's state")
    mirror = Mirror(run_dir, settings, log)
    mirror.start()
    try:
        yield
    finally:
        mirror.close()
