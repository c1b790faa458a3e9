"""Run ids for the shell's completion (`orch monitor <TAB>`), fast and without side effects.

They come from this computer's cache of the runs a machine has (``$XDG_CACHE_HOME/orch/run-ids/``,
one file per machine and remote.root, written by `orch runs`, a launch and `orch rm`), else from
the machine itself when it answers within QUICK seconds; an instance is never started for it,
and nothing is printed. Whatever goes wrong, completion offers nothing rather than an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from orchestrator.config import DeployConfig
from trainer.contract import layout

QUICK = 2.0  # seconds the machine gets to answer a completion
MAX_IDS = 10_000


def cache_path(cfg: DeployConfig) -> Path:
    """The cache file of the machine (and remote.root) ``cfg`` names."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    where = [cfg.target, cfg.ssh.host, cfg.ssh.port, cfg.ec2.region, cfg.ec2.instance_id, cfg.ec2.name,
             cfg.remote_root]
    key = hashlib.sha256(json.dumps(where).encode()).hexdigest()[:20]
    return base / "orch" / "run-ids" / f"{key}.json"


def cached(cfg: DeployConfig) -> list[str] | None:
    """The cached run ids, newest first (None: no cache)."""
    try:
        doc = json.loads(cache_path(cfg).read_bytes()[: 1 << 20])
    except (OSError, ValueError):
        return None
    ids = doc.get("run_ids") if isinstance(doc, dict) else None
    if not isinstance(ids, list):
        return None
    return [i for i in ids[:MAX_IDS] if isinstance(i, str) and layout.is_run_id(i)]  # shell-safe words only


def remember(cfg: DeployConfig, run_ids: Iterable[str]) -> None:
    """Cache these run ids (newest first) for completion; a cache that cannot be written is no error."""
    path = cache_path(cfg)
    ids = [i for i in dict.fromkeys(run_ids) if layout.is_run_id(i)][:MAX_IDS]
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"run_ids": ids}))
        os.replace(tmp, path)


def add(cfg: DeployConfig, run_id: str) -> None:
    """A run just launched: first in the cache (when there is one; else the next completion asks)."""
    ids = cached(cfg)
    if ids is not None:
        remember(cfg, [run_id, *ids])


def forget(cfg: DeployConfig, run_ids: Iterable[str]) -> None:
    gone, ids = set(run_ids), cached(cfg)
    if ids is not None:
        remember(cfg, [i for i in ids if i not in gone])


def _from_machine(cfg: DeployConfig) -> list[str]:
    """The machine's run ids, newest first, if it answers within QUICK seconds (cached then)."""
    found: list[str] = []

    def ask() -> None:
        from orchestrator.context import Context
        from orchestrator.provision import acquire, quick_reach
        from orchestrator.runs import newest_first

        with contextlib.suppress(Exception), acquire(Context(cfg), within=min(QUICK, quick_reach(cfg))) as m:
            found.extend(r.run_id for r in newest_first(m.runs()))
            remember(cfg, found)

    thread = threading.Thread(target=ask, daemon=True, name="orch-complete")
    thread.start()
    thread.join(QUICK + 1.0)  # a hard bound: a slow answer is left behind, and completion offers nothing
    return list(found) if not thread.is_alive() else []


def run_ids(config: str, incomplete: str = "") -> list[str]:
    """The run ids that start with ``incomplete``, newest first, for deploy.yaml at ``config``."""
    from orchestrator.config import load_config
    from orchestrator.errors import OrchError

    try:
        cfg = load_config(config)
    except OrchError:
        return []
    ids = cached(cfg)
    if ids is None:
        ids = _from_machine(cfg)
    return [i for i in ids if i.startswith(incomplete)]
