"""``orch download``: bring a run's best checkpoint and stats back, verified and atomic.

Every file listed in the run's MANIFEST.sha256 is streamed into a temporary name beside its
destination while its sha256 is computed, compared with the manifest, and only then renamed
into place. A file already present with the right checksum is not fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import DeployConfig
from orchestrator.errors import OrchError, RemoteError
from orchestrator.machine import connect
from orchestrator.remote import q
from trainer import layout

Progress = Callable[[str, int, int], None]  # (file, bytes done in all, total bytes)


class ChecksumError(RemoteError):
    """A file did not match the run's manifest (it is not kept)."""


@dataclass
class Downloaded:
    run_id: str
    best_val_accuracy: float | None
    dest: Path
    fetched: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "best_val_accuracy": self.best_val_accuracy, "dest": str(self.dest),
                "fetched": self.fetched, "already_there": self.already_there}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download(cfg: DeployConfig, run_id: str | None = None, *, latest: bool = False, dest: Path = Path("artifacts"),
             progress: Progress | None = None, trust_new_host: bool = False,
             log: Callable[[str], None] = lambda _m: None) -> Downloaded:
    """Download RUN (default: the finished run with the best val accuracy; ``latest``: the
    newest run) into ``dest/<run_id>/``."""
    with connect(cfg, trust_new_host=trust_new_host, log=log) as m, ThreadPoolExecutor(1) as pool:
        # A named run needs no look-up of every run (one round trip less).
        name = run_id if run_id else m.choose(None, best=not latest).run_id
        run_dir, target = m.run_dir(name), dest / name
        counted: dict[str, int] = {}
        total = 0

        def report(rel: str, n: int) -> None:
            counted[rel] = n
            if progress is not None:
                progress(rel, sum(counted.values()), total)

        # The checkpoint is nearly all the bytes: it starts now, beside the manifest look-up,
        # and is checked against the manifest when that arrives.
        best_local = target / layout.BEST_WEIGHTS
        early = None if best_local.exists() else _start(pool, m.remote, f"{run_dir}/{layout.BEST_WEIGHTS}",
                                                         best_local, lambda n: report(layout.BEST_WEIGHTS, n))
        try:
            found = m.remote.run(_describe_command(run_dir), check=False)
            if found.code != 0:
                raise OrchError(f"no run {name!r} with a {layout.MANIFEST} on {m.remote.host} (no finished epoch "
                                "yet?); `orch runs` lists the runs")
            manifest_text, status_text, sizes_text = found.stdout.split(f"{_SEP}\n", 2)
            manifest = layout.parse_manifest(manifest_text)
            try:
                best = json.loads(status_text).get("best_val_accuracy")
            except ValueError:
                best = None
            sizes = _parse_wc(sizes_text, manifest)
            result = Downloaded(name, best, target)
            todo = []
            for rel, digest in manifest.items():
                local = target / rel
                if (rel != layout.BEST_WEIGHTS or early is None) and local.is_file() and sha256_of(local) == digest:
                    result.already_there.append(rel)
                else:
                    todo.append(rel)
            total = sum(sizes.get(rel, 0) for rel in todo)
            for rel in todo:
                if rel == layout.BEST_WEIGHTS and early is not None:
                    job, early = early, None
                else:
                    job = _start(pool, m.remote, f"{run_dir}/{rel}", target / rel, lambda n, r=rel: report(r, n))
                _finish(job, target / rel, manifest[rel], rel)
                result.fetched.append(rel)
            return result
        finally:
            if early is not None:  # not wanted after all (not in the manifest, or an error)
                _discard(early)


@dataclass
class _Job:
    future: Future[str]
    tmp: Path


def _start(pool: ThreadPoolExecutor, remote: Any, path: str, local: Path, progress: Callable[[int], None]) -> _Job:
    """Fetch ``path`` into a temp name beside ``local`` (in the pool's thread)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    return _Job(pool.submit(remote.fetch, path, tmp, progress), tmp)


def _finish(job: _Job, local: Path, digest: str, rel: str) -> None:
    """Wait for the fetch, check its sha256 against the manifest, rename it into place."""
    try:
        got = job.future.result()
        if got != digest:
            raise ChecksumError(f"{rel}: checksum mismatch with the run's {layout.MANIFEST} (expected "
                                f"{digest[:12]}..., got {got[:12]}...); not saved. Was the run still "
                                "writing it? Try again once it has finished")
        os.replace(job.tmp, local)
    finally:
        job.tmp.unlink(missing_ok=True)


def _discard(job: _Job) -> None:
    with contextlib.suppress(Exception):
        job.future.result()
    job.tmp.unlink(missing_ok=True)


_SEP = "@@orch@@"


def _describe_command(run_dir: str) -> str:
    """Manifest, status and the listed files' sizes, in ONE remote command (plain shell: no
    interpreter to start)."""
    return (f"cd {q(run_dir)} && cat {layout.MANIFEST} && echo {_SEP} && "
            f"{{ cat {layout.STATUS} 2>/dev/null || echo '{{}}'; }} && echo && echo {_SEP} && "
            f"cut -c67- {layout.MANIFEST} | tr '\\n' '\\0' | xargs -0 wc -c")


def _parse_wc(text: str, manifest: dict[str, str]) -> dict[str, int]:
    sizes = {}
    for line in text.splitlines():
        count, _, name = line.strip().partition(" ")
        if name in manifest and count.isdigit():
            sizes[name] = int(count)
    return sizes
