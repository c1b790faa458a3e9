"""Shared fixtures: every test gets its own loader cache and ~/.cache, never the user's."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

# A suite started as a background job of a non-interactive shell (`make test &`, a CI step's
# `cmd &`) inherits SIGINT and SIGQUIT ignored, and so would every orch the tests start: the
# tests that press Ctrl-C (SIGINT) then wait for an orch that cannot hear it. Python catches
# SIGINT only where it was not ignored, so the tests' processes get the default back here.
for _sig, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGQUIT, signal.SIG_DFL)):
    if signal.getsignal(_sig) == signal.SIG_IGN:
        signal.signal(_sig, _default)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("trainer-cache")
    monkeypatch.setenv("ORCH_TRAINER_CACHE", str(cache))
    # ... and its own ~/.cache (orch's run-id cache, the machine side's preflight cache), never the user's
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    return cache


def frames(t: int = 5, d: int = 8, seed: int = 0, value: float | None = None) -> np.ndarray:
    """A small (T, D) float32 array; constant when ``value`` is given."""
    if value is not None:
        return np.full((t, d), value, dtype=np.float32)
    return np.random.default_rng(seed).standard_normal((t, d)).astype(np.float32)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def local_machine(root: Path, cfg: object | None = None, **config: object) -> object:
    """A connected Machine for ``target: local`` with remote.root ``root`` (or the given config),
    as orchestrator.provision.acquire would give."""
    import sys

    from orchestrator.config import DeployConfig
    from orchestrator.context import Context
    from orchestrator.local import LocalRemote
    from orchestrator.machine import Machine

    if cfg is None:
        cfg = DeployConfig.model_validate({"target": "local", "base_dir": root,
                                           "remote": {"root": str(root), "python": sys.executable}} | config)
    return Machine(Context(cfg), LocalRemote(root))
