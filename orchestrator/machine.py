"""An open connection to the training machine plus what every command asks of it: the
runs there, one run's snapshot, choosing a run. Each question is ONE remote command."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError
from orchestrator.remote import Remote, q
from orchestrator.sync import CodeSync, sync_code
from orchestrator.target import open_remote
from trainer import layout

Log = Callable[[str], None]
DIED = "died"  # the process is gone but status.json still says running


def is_active(run: dict[str, Any]) -> bool:
    """Running, and its process really alive (pid and start time match)."""
    return run["state"] == layout.RUNNING and bool(run["alive"])


def state_of(run: dict[str, Any]) -> str | None:
    """The run's state as users see it: ``died`` when the process is gone mid-run."""
    return DIED if run["state"] == layout.RUNNING and not run["alive"] else run["state"]


@dataclass
class Machine:
    cfg: DeployConfig
    remote: Remote
    root: str  # remote.root, absolute
    log: Log = lambda _m: None
    setup: bool = False
    _code: CodeSync | None = None

    @property
    def code(self) -> CodeSync:
        """The current code version on the machine, sent (tiny) the first time it is needed."""
        if self._code is None:
            self._code = sync_code(self.remote, self.cfg, self.log, run_setup=self.setup)
        return self._code

    def run_dir(self, run_id: str) -> str:
        return layout.run_dir(self.root, run_id)

    def probe(self, *args: str | int) -> dict[str, Any]:
        command = (f"PYTHONPATH={q(self.code.path)} {q(self.cfg.remote_python)} -m trainer.probe "
                   + " ".join(q(str(a)) for a in args))
        return json.loads(self.remote.run(command, what="asking the machine").stdout)

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        runs = self.probe("runs", self.root)["runs"]
        return sorted(runs, key=lambda r: (r.get("created") or 0, r["run_id"]))

    def snapshot(self, run_id: str, metrics_offset: int = 0, log_lines: int = 10) -> dict[str, Any]:
        return self.probe("snapshot", self.run_dir(run_id), metrics_offset, log_lines)

    def choose(self, run_id: str | None, *, best: bool = False, finished: bool = False) -> dict[str, Any]:
        """The named run; else the finished run with the highest best val accuracy (``best``);
        else the latest run."""
        runs = self.runs()
        if run_id is not None:
            for r in runs:
                if r["run_id"] == run_id:
                    return r
            raise ConfigError(f"no run {run_id!r} on {self.remote.host}; `orch runs` lists them")
        pool = [r for r in runs if r["state"] == layout.FINISHED] if finished or best else runs
        if best:
            pool = [r for r in pool if r.get("best_val_accuracy") is not None]
            if pool:
                return max(pool, key=lambda r: r["best_val_accuracy"])
        elif pool:
            return pool[-1]
        kind = "finished run with a best checkpoint" if best or finished else "run"
        raise ConfigError(f"no {kind} on {self.remote.host}; start one with `orch deploy`")


@contextmanager
def connect(cfg: DeployConfig, *, trust_new_host: bool = False, setup: bool = False,
            log: Log = lambda _m: None) -> Iterator[Machine]:
    """Open the machine. The current code version is made sure of when first needed (sent
    only if missing); ``setup`` also runs remote.setup for a new version."""
    with open_remote(cfg, trust_new_host=trust_new_host, log=log) as remote:
        yield Machine(cfg, remote, remote.expand(cfg.remote_root), log, setup)
