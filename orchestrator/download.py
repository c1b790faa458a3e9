"""``orch download``: bring a run's best checkpoint and stats back, verified and atomic.

Every file listed in the run's MANIFEST.sha256 is streamed into a temporary name beside its
destination while its sha256 is computed, compared with the manifest, and only then renamed
into place. A file already present with the right checksum is not fetched again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
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
    with connect(cfg, trust_new_host=trust_new_host, log=log) as m:
        run = m.choose(run_id) if run_id or latest else m.choose(None, best=True)
        run_dir = m.run_dir(run["run_id"])
        listing = m.remote.run(f"cd {q(run_dir)} && cat {layout.MANIFEST}", check=False)
        if listing.code != 0:
            raise OrchError(f"run {run['run_id']} has no {layout.MANIFEST} yet (no finished epoch?)")
        manifest = layout.parse_manifest(listing.stdout)
        target = dest / run["run_id"]
        result = Downloaded(run["run_id"], run.get("best_val_accuracy"), target)
        todo = []
        for rel, digest in manifest.items():
            local = target / rel
            if local.is_file() and sha256_of(local) == digest:
                result.already_there.append(rel)
            else:
                todo.append(rel)
        sizes = _sizes(m.remote, run_dir, todo)
        total, done = sum(sizes.values()), 0
        for rel in todo:
            done = _fetch(m.remote, f"{run_dir}/{rel}", target / rel, manifest[rel], rel, done, total, progress)
            result.fetched.append(rel)
        return result


def _sizes(remote: Any, run_dir: str, rels: list[str]) -> dict[str, int]:
    if not rels:
        return {}
    out = remote.run(f"cd {q(run_dir)} && wc -c -- {' '.join(q(r) for r in rels)}", check=False).stdout
    sizes = {}
    for line in out.splitlines():
        count, _, name = line.strip().partition(" ")
        if name in rels:
            sizes[name] = int(count)
    return sizes


def _fetch(remote: Any, path: str, local: Path, digest: str, rel: str, done: int, total: int,
           progress: Progress | None) -> int:
    """Stream one file into a temp name, verify, rename. Returns the new bytes-done count."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as fh:
            def sink(block: bytes) -> None:
                nonlocal done
                fh.write(block)
                h.update(block)
                done += len(block)
                if progress is not None:
                    progress(rel, done, total)
            remote.read_file(path, sink)
        if h.hexdigest() != digest:
            raise ChecksumError(f"{rel}: checksum mismatch with the run's {layout.MANIFEST} (expected "
                                f"{digest[:12]}..., got {h.hexdigest()[:12]}...); not saved. Was the run still "
                                "writing it? Try again once it has finished")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return done
