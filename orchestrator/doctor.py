"""`orch doctor`: every check a first day needs, in order, each ok or failed with the fix,
down to the GPU (like `sky check`). It never starts an instance and never trusts a new host
key; a failed step skips the checks that depend on it. Each failure carries the exit code the
same failure has elsewhere (3 for AWS, 4 for a connection, 5 for a host key, 12 not ready, 13
no data): doctor exits with the first one's."""

from __future__ import annotations

from pathlib import Path

from orchestrator.context import Context, Output, Trust
from orchestrator.environment import existing_python
from orchestrator.errors import OrchError
from orchestrator.preflight import Finding, ask, findings
from orchestrator.provision import acquire, provider
from trainer.contract import verbs
from trainer.contract.exitcodes import ExitCode

SKIPPED = "skipped: an earlier check failed"


def exit_code(results: list[Finding]) -> ExitCode:
    """0 when every check passed, else the first failure's code."""
    return next((r.exit_code for r in results if not r.ok), ExitCode.OK)


def doctor(config_path: str, output: Output | None = None, fresh: bool = False) -> list[Finding]:
    """Run the checks; the first failure of a step that others need ends the list there.
    ``fresh``: import TensorFlow again even when the machine's cached answer still holds."""
    from orchestrator.config import load_config

    try:
        cfg = load_config(config_path)
    except OrchError as exc:
        return [Finding("config", False, str(exc), f"fix {config_path} (`orch config schema` lists every key)",
                        exc.exit_code)]
    ctx = Context(cfg, output, Trust(accept_new=False))  # doctor never trusts a new host key
    results = [Finding("config", True, f"{Path(config_path)}: target {cfg.target}")]
    if cfg.target == "ec2" and not _instance(ctx, results):
        return results
    _machine(ctx, results, fresh)
    return results


def _instance(ctx: Context, results: list[Finding]) -> bool:
    try:
        inst = provider(ctx).status()
    except OrchError as exc:
        results.append(Finding("aws", False, str(exc), "check the AWS credentials (AWS_PROFILE, ~/.aws, ec2.profile), "
                               "ec2.region and ec2.name / ec2.instance_id", exc.exit_code))
        return False
    assert inst is not None
    results.append(Finding("aws", True, f"credentials and region {ctx.cfg.ec2.region} work"))
    results.append(Finding("instance", inst.running, f"{inst.id} ({inst.type}): {inst.state}",
                           f"instance {inst.id} is {inst.state}: `orch up` starts it (doctor does not)",
                           ExitCode.INSTANCE_STOPPED))
    return inst.running


def _shell(noise: list[str]) -> Finding:
    """What the login shell prints before every command: orch looks past it (its answers are
    framed), but scp, sftp and rsync break on it."""
    if not noise:
        return Finding("shell", True, "the login shell prints nothing before a command")
    shown = " | ".join(line[:80] for line in noise[:3])
    return Finding("shell", True, f"the login shell prints {len(noise)} line(s) before every command: {shown}",
                   "orch ignores it, but scp, sftp and rsync break on it: in ~/.bashrc (or ~/.zshenv) print only "
                   "in interactive shells (after `[ -z \"$PS1\" ] && return`)", warning=True)


def _machine(ctx: Context, results: list[Finding], fresh: bool) -> None:
    local = ctx.cfg.target == "local"
    try:
        with acquire(ctx) as m:
            if local:  # no SSH at all: the machine is this computer
                results.append(Finding("machine", True, f"this computer (target local), remote.root {m.root}"))
            else:
                results.append(Finding("ssh", True, f"{m.remote.host} reachable, host key known"))
                results.append(_shell(m.ask(verbs.HOME).noise))
            python = existing_python(m)
            if python is None:
                results.append(Finding("env", False, "the managed environment is not built yet",
                                       "`orch deploy` builds it (once per requirements)"))
                return
            results += findings(m, python, ask(m, python, import_tensorflow=fresh))
    except OrchError as exc:
        step = "ssh" if not local and not any(r.check == "ssh" for r in results) else "machine"
        results.append(Finding(step, False, str(exc), "see the message: `orch trust` for an unknown host key, the "
                               "security group and ssh.* settings for a connection", exc.exit_code))
