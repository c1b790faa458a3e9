"""`orch doctor`: every check a first day needs, in order, each ok or failed with the fix,
down to the GPU (like `sky check`). It never starts an instance and never trusts a new host
key; a failed step skips the checks that depend on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator.errors import OrchError
from orchestrator.preflight import Finding

Log = Callable[[str], None]
SKIPPED = "skipped: an earlier check failed"


def doctor(config_path: str, log: Log = lambda _m: None) -> list[Finding]:
    """Run the checks; the first failure of a step that others need ends the list there."""
    from orchestrator.config import load_config

    results: list[Finding] = []
    try:
        cfg = load_config(config_path)
    except OrchError as exc:
        return [Finding("config", False, str(exc), f"fix {config_path} (`orch config schema` lists every key)")]
    results.append(Finding("config", True, f"{Path(config_path)}: target {cfg.target}"))
    if cfg.target == "ec2" and not _instance(cfg, results):
        return results
    _machine(cfg, results, log)
    return results


def _instance(cfg: object, results: list[Finding]) -> bool:
    from orchestrator import ec2

    try:
        client = ec2.client(cfg.ec2)  # type: ignore[attr-defined]
        inst = ec2.find_instance(client, cfg.ec2)  # type: ignore[attr-defined]
    except OrchError as exc:
        results.append(Finding("aws", False, str(exc), "check the AWS credentials (AWS_PROFILE, ~/.aws, ec2.profile), "
                               "ec2.region and ec2.name / ec2.instance_id"))
        return False
    results.append(Finding("aws", True, f"credentials and region {cfg.ec2.region} work"))  # type: ignore[attr-defined]
    running = inst.state == "running"
    results.append(Finding("instance", running, f"{inst.instance_id} ({inst.instance_type}): {inst.state}",
                           f"instance {inst.instance_id} is {inst.state}: `orch up` starts it (doctor does not)"))
    return running


def _machine(cfg: object, results: list[Finding], log: Log) -> None:
    from orchestrator.environment import existing_python
    from orchestrator.machine import connect
    from orchestrator.preflight import ask, findings

    try:
        with connect(cfg, log=log) as m:  # type: ignore[arg-type]
            results.append(Finding("ssh", True, f"{m.remote.host} reachable, host key known"))
            python = existing_python(m)
            if python is None:
                results.append(Finding("env", False, "the managed environment is not built yet",
                                       "`orch deploy` builds it (once per requirements)"))
                return
            results += findings(m, python, ask(m, python, import_tensorflow=True))
    except OrchError as exc:
        step = "ssh" if not any(r.check == "ssh" for r in results) else "machine"
        results.append(Finding(step, False, str(exc), "see the message: `orch trust` for an unknown host key, the "
                               "security group and ssh.* settings for a connection"))
