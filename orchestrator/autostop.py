"""Autostop: arm (or disarm) the watcher on the machine (trainer/watcher.py) after a launch,
with deploy.yaml's `autostop:` setting or `--autostop N|off`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError, RemoteError
from orchestrator.machine import Machine
from orchestrator.remote import q
from trainer.wire import Autostop

Log = Callable[[str], None]
OFF = "off"


@dataclass(frozen=True)
class AutostopPlan:
    """What a deploy does to the machine's autostop: leave it as it is, disarm, or arm."""

    change: bool
    idle_minutes: float | None = None  # None with change: disarm
    command: str = ""


def plan(cfg: DeployConfig, given: str | None) -> AutostopPlan:
    """From `--autostop N|off` (wins) or deploy.yaml; checked before anything connects."""
    if given is None and cfg.autostop.idle_minutes is None:
        return AutostopPlan(change=False)
    if given is not None and given.strip().lower() == OFF:
        return AutostopPlan(change=True)
    try:
        minutes = float(given) if given is not None else cfg.autostop.idle_minutes
    except ValueError:
        raise ConfigError(f"--autostop: give idle minutes (e.g. 30, 0.5) or `off`, not {given!r}") from None
    if minutes is None or not minutes > 0 or minutes != minutes:
        raise ConfigError(f"--autostop: idle minutes must be > 0, got {given!r}")
    if cfg.target == "local" and "command" not in cfg.autostop.model_fields_set:
        raise ConfigError("autostop on target local would shut this computer down: set autostop.command "
                          "explicitly if that is what you want")
    return AutostopPlan(change=True, idle_minutes=minutes, command=cfg.autostop.command)


def apply(m: Machine, autostop: AutostopPlan, log: Log) -> Autostop | None:
    """Arm or disarm the watcher; each deploy re-arms it (the idle clock starts again)."""
    if not autostop.change:
        return None
    args = ["arm", "--idle-minutes", str(autostop.idle_minutes), "--command", autostop.command] \
        if autostop.idle_minutes is not None else ["disarm"]
    out = m.remote.run(f"PYTHONPATH={q(m.code.path)} {q(m.cfg.helper_python)} -m trainer.watcher {q(m.root)} "
                       + " ".join(q(a) for a in args), what="setting autostop").stdout
    try:
        state = Autostop.from_json(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError) as exc:
        raise RemoteError(f"setting autostop on {m.remote.host}: its answer was not understood "
                          f"({out[:200]!r})") from exc
    log(describe(state))
    return state


def describe(state: Autostop) -> str:
    """'autostop: `sudo shutdown -h now` after 30 idle minutes; in 12 min' / 'autostop: off'."""
    if not state.armed:
        return "autostop: off"
    text = f"autostop: `{state.command}` after {state.idle_minutes:g} idle minutes"
    if not state.watcher_alive:
        return text + " (its watcher is not running: the next deploy starts it)"
    if state.stops_at is not None and state.now is not None:
        return text + f"; runs in {max(0.0, state.stops_at - state.now) / 60:.1f} min unless a run starts"
    return text + "; a run is active"
