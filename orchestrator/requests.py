"""What `orch deploy` and `orch resume` are asked to do beyond the config, as typed records
(the CLI fills them from its options; tests and other callers build them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LaunchOptions:
    """What deploy and resume share: a busy machine, a GPU box without usable GPUs, autostop."""

    force: bool = False  # start even though another run is active
    allow_cpu: bool = False  # train on the CPU of a GPU box whose GPUs TensorFlow cannot see
    autostop: str | None = None  # `--autostop MINUTES|off` (None: deploy.yaml's)
    gpu: int | None = None  # the run gets this GPU of the machine alone, beside runs on the others (None: all)

    @property
    def beside_others(self) -> bool:
        """Whether another active run may be there: with --force, or on a GPU of its own (the
        machine's launch then checks that GPU, atomically)."""
        return self.force or self.gpu is not None


@dataclass(frozen=True)
class Extension:
    """`orch resume`'s recipe overrides (None: the recipe's value, trainer/contract/options.py)."""

    epochs: int | None = None
    learning_rate: float | None = None
    warmup_epochs: int | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
