"""`orch` as a process whose parallel sweep's machines are each their own: the sweep's instance
k (a real moto EC2 instance, whose made-up address is replaced by the one loopback sshd's,
127.0.0.1) gets remote.root <root>-<k>, as an instance of its own has a disk of its own.
Everything else is orch's own code.

    python -m tests.integration.sweep_machines sweep run SPEC -c deploy.yaml
"""

from __future__ import annotations

from orchestrator import sweep
from orchestrator.cli import main

_machine_config = sweep.machine_config


def machine_config(cfg, spec, slot):  # noqa: ANN001, ANN201
    got = _machine_config(cfg, spec, slot)
    if slot == 0:
        return got
    return got.model_copy(update={"remote": got.remote.model_copy(update={"root": f"{cfg.remote.root}-{slot}"}),
                                  "ssh": got.ssh.model_copy(update={"host": "127.0.0.1"})})


sweep.machine_config = machine_config
main()
