"""An open connection to the training machine plus what every command asks of it: the
runs there, one run's snapshot, choosing a run. Each question is ONE remote command, answered
by ``trainer.probe`` as a record of trainer/wire.py.

The probe's few pure-Python modules travel with each question (on stdin), so asking never
uploads code: read-only commands leave the machine as they found it.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError, RemoteError
from orchestrator.remote import Remote, Result, q
from orchestrator.sync import CodeSync, sync_code
from orchestrator.target import open_remote
from trainer import envsetup, layout, preflight, probe
from trainer.wire import Host, RunInfo, Snapshot

Log = Callable[[str], None]

# Runs a trainer module's main() from a zip read on stdin: a meta-path importer for exactly the
# modules in the zip. `python -c BOOTSTRAP trainer.probe ARGS...`
_BOOTSTRAP = """\
import importlib.abc, importlib.util, io, sys, zipfile
z = zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read()))
names = set(z.namelist())
def source(name):
    base = name.replace('.', '/')
    return next((p for p in (base + '/__init__.py', base + '.py') if p in names), None)
class Zip(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        src = source(name)
        return src and importlib.util.spec_from_loader(name, self, is_package=src.endswith('__init__.py'))
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        src = source(module.__name__)
        exec(compile(z.read(src), src, 'exec'), module.__dict__)
sys.meta_path.insert(0, Zip())
module = importlib.import_module(sys.argv[1])
sys.exit(module.main(sys.argv[2:]))
"""


# The machine-side modules orch asks questions of, and the pure-Python files each imports.
ASKABLE = {"trainer.probe": probe.MODULES, "trainer.preflight": preflight.MODULES,
           "trainer.envsetup": envsetup.MODULES}


@cache
def bundle(module: str) -> bytes:
    """A zip of ``module``'s files, sent on stdin with every question to it."""
    package = Path(probe.__file__).parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in ASKABLE[module]:
            z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), (package.parent / name).read_bytes())
    return buf.getvalue()


@dataclass
class Machine:
    cfg: DeployConfig
    remote: Remote
    root: str  # remote.root, absolute
    log: Log = lambda _m: None
    _code: CodeSync | None = None

    @property
    def code(self) -> CodeSync:
        """The current code version on the machine, sent (tiny) the first time it is needed."""
        if self._code is None:
            self._code = sync_code(self.remote, self.cfg, self.log)
        return self._code

    def run_dir(self, run_id: str) -> str:
        return layout.run_dir(self.root, run_id)

    def ask(self, module: str, *args: str | int, python: str | None = None, check: bool = True,
            on_line: Callable[[str], None] | None = None) -> Result:
        """Run a machine-side module (its files travel on stdin: nothing is uploaded)."""
        payload = bundle(module)
        command = (f"{q(python or self.cfg.helper_python)} -c {q(_BOOTSTRAP)} {q(module)} "
                   + " ".join(q(str(a)) for a in args))
        return self.remote.run(command, write=lambda fh: fh.write(payload), what="asking the machine", check=check,
                               on_line=on_line)

    def probe(self, *args: str | int) -> dict:
        out = self.ask("trainer.probe", *args).stdout
        try:
            return json.loads(out)
        except ValueError as exc:
            raise RemoteError(f"the machine's answer was not understood: {out[:200]!r}") from exc

    def runs(self) -> list[RunInfo]:
        """Every run, oldest first."""
        runs = [RunInfo.from_json(r) for r in self.probe("runs", self.root)["runs"]]
        return sorted(runs, key=lambda r: (r.created or 0, r.run_id))

    def host(self) -> Host:
        return Host.from_json(self.probe("host"))

    def snapshot(self, run_id: str, metrics_offset: int = 0, log_lines: int = 10) -> Snapshot:
        return Snapshot.from_json(self.probe("snapshot", self.run_dir(run_id), metrics_offset, log_lines))

    def choose(self, run_id: str | None, *, best: bool = False, finished: bool = False) -> RunInfo:
        """The named run (its full id or any unique prefix); else the finished run with the
        highest best val accuracy (``best``); else the latest run."""
        runs = self.runs()
        if run_id is not None:
            return find_run(runs, run_id, self.remote.host)
        pool = [r for r in runs if r.state == layout.FINISHED] if finished or best else runs
        if best:
            pool = [r for r in pool if r.best_val_accuracy is not None]
            if pool:
                return max(pool, key=lambda r: r.best_val_accuracy or 0.0)
        elif pool:
            return pool[-1]
        kind = "finished run with a best checkpoint" if best or finished else "run"
        raise ConfigError(f"no {kind} on {self.remote.host}; start one with `orch deploy`")


def find_run(runs: list[RunInfo], run_id: str, host: str) -> RunInfo:
    """The run whose id is ``run_id``, else the one it is a unique prefix of."""
    exact = [r for r in runs if r.run_id == run_id]
    if exact:
        return exact[0]
    matches = [r for r in runs if r.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(r.run_id for r in matches[:8]) + (", ..." if len(matches) > 8 else "")
        raise ConfigError(f"run id {run_id!r} is ambiguous on {host}: it starts {len(matches)} runs ({shown}); "
                          "give more of it")
    raise ConfigError(f"no run {run_id!r} on {host}; `orch runs` lists them")


@contextmanager
def connect(cfg: DeployConfig, *, trust_new_host: bool = False, start: bool = False,
            log: Log = lambda _m: None) -> Iterator[Machine]:
    """Open the machine (``start``: a stopped instance may be started: deploy and resume only).
    The current code version is made sure of when first needed (sent only if missing)."""
    with open_remote(cfg, trust_new_host=trust_new_host, log=log, start=start) as remote:
        yield Machine(cfg, remote, remote.expand(cfg.remote_root), log)
