"""Autostop: arm (or disarm) the watcher on the machine (trainer/machine/watcher.py) after a
launch, with deploy.yaml's `autostop:` setting or `--autostop N|off`."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import DeployConfig
from orchestrator.errors import ConfigError
from orchestrator.machine import Machine
from trainer.contract import verbs
from trainer.contract.wire import Autostop

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


def launch_args(autostop: AutostopPlan) -> list[str]:
    """What the launch does to autostop, in the same step as the launch (each deploy re-arms it:
    the idle clock starts again); trainer/machine/launch.py."""
    if not autostop.change:
        return []
    if autostop.idle_minutes is None:
        return ["--autostop-off"]
    return ["--autostop-minutes", str(autostop.idle_minutes), "--autostop-command", autostop.command]


def wake(m: Machine) -> Autostop:
    """After a reboot the setting is still there but its watcher is not: start it again."""
    return _watcher(m, "wake", "--code", m.code.path)


def _watcher(m: Machine, *args: str) -> Autostop:
    state = m.answer(verbs.AUTOSTOP, m.root, *args)
    m.log(describe(state))
    return state


def describe(state: Autostop) -> str:
    """'autostop: `sudo shutdown -h now` after 30 idle minutes; in 12 min' / 'autostop: off'."""
    if not state.armed:
        return "autostop: off"
    text = f"autostop: `{state.command}` after {state.idle_minutes:g} idle minutes"
    if state.error:
        text += f"; it FAILED last time ({state.error}): the machine is still running, fix autostop.command"
    if not state.watcher_alive:
        return text + " (its watcher is not running: the next deploy starts it)"
    if state.stops_at is not None and state.now is not None:
        return text + f"; runs in {max(0.0, state.stops_at - state.now) / 60:.1f} min unless a run starts"
    return text + "; a run is active"
