"""What every command runs with, in one object (httpie's injectable Environment is the model):
the configuration, where output goes, the SSH trust policy, and the log. The CLI builds one per
invocation; tests build their own (``Context(cfg)``, or with an :class:`Output` that captures)."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import DeployConfig


@dataclass
class Output:
    """Where output goes: ``out`` for results, ``err`` for the log and errors. Markup is off:
    paths, run ids and whatever the machine sends are shown as they are, brackets included."""

    out: Any  # rich Console
    err: Any
    stdin_isatty: bool = False
    label: str = ""  # said before each log line: which machine of several (a parallel sweep's)

    @classmethod
    def terminal(cls) -> Output:
        from rich.console import Console

        for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets it escaped
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")

        return cls(Console(highlight=False, soft_wrap=True, markup=False),
                   Console(stderr=True, highlight=False, soft_wrap=True, markup=False), sys.stdin.isatty())

    @classmethod
    def captured(cls, width: int = 200) -> Output:
        """Consoles writing to StringIO (``.out.file.getvalue()``): for tests."""
        from rich.console import Console

        return cls(Console(file=io.StringIO(), width=width, highlight=False, markup=False),
                   Console(file=io.StringIO(), width=width, highlight=False, markup=False))

    def log(self, message: str) -> None:
        from rich.text import Text

        from orchestrator.terminal import clean

        self.err.print(Text.assemble(("orch:", "dim"), " ", (f"{self.label}: " if self.label else ""), clean(message)))


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class Trust:
    """The SSH host-key policy: a known key must match; an unknown one is accepted only when it
    matches the instance's console fingerprints, or when the user said so (``accept_new``)."""

    accept_new: bool = False


@dataclass(frozen=True)
class Context:
    cfg: DeployConfig
    output: Output | None = None  # None: nothing is printed (a library caller, a test)
    trust: Trust = field(default_factory=Trust)
    debug: bool = False

    @property
    def log(self) -> Callable[[str], None]:
        return self.output.log if self.output is not None else _quiet

    def labelled(self, label: str, cfg: DeployConfig) -> Context:
        """The same context for another machine (``cfg``), its log lines labelled."""
        return replace(self, cfg=cfg, output=replace(self.output, label=label) if self.output is not None else None)

    def trusting_new_hosts(self) -> Context:
        """The same context, accepting an unknown host key (`orch trust`)."""
        return replace(self, trust=Trust(accept_new=True))
