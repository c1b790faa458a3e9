"""``orch``: parse, call one core function, render. Errors are mapped to exit codes in
:func:`main` and nowhere else."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from orchestrator import __version__
from orchestrator.errors import ExitCode, OrchError

app = typer.Typer(
    name="orch",
    help="Train on a remote EC2 GPU box without hand-written deploy/monitor/download scripts.\n\n"
    "Every command reads deploy.yaml (-c to choose another file); `target: local` runs the same "
    "flow on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate deploy.yaml or print its JSON schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option("deploy.yaml", "--config", "-c", help="the configuration file")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of text")
TrustOpt = typer.Option(False, "--trust-new-host", help="accept an unknown SSH host key (and remember it)")


class Env:
    """Where output goes; tests swap the consoles."""

    def __init__(self) -> None:
        from rich.console import Console

        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def log(self, message: str) -> None:
        self.err.print(f"[dim]orch:[/dim] {message}")


env = Env()


def _load(path: str) -> Any:
    from orchestrator.config import load_config

    return load_config(path)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors")) -> None:
    """(--debug is read by main())"""


@app.command()
def version() -> None:
    """Print orch's version."""
    env.out.print(f"orch {__version__}")


@config_app.command("check")
def config_check(config: str = ConfigOpt) -> None:
    """Validate the file and print the resolved configuration (defaults filled in)."""
    cfg = _load(config)
    env.out.print_json(json.dumps(cfg.model_dump(mode="json")))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of deploy.yaml (for editor completion)."""
    from orchestrator.config import json_schema

    env.out.print_json(json.dumps(json_schema()))


@app.command()
def up(config: str = ConfigOpt) -> None:
    """Start the EC2 instance and wait until it runs."""
    from orchestrator import ec2

    cfg = _require_ec2(_load(config))
    inst = ec2.ensure_running(ec2.client(cfg.ec2), cfg.ec2, allow_start=True, log=env.log)
    env.out.print(f"{inst.instance_id} {inst.state} {inst.address or '(no public address)'}")


@app.command()
def down(config: str = ConfigOpt) -> None:
    """Stop the EC2 instance (its disk, runs and data stay)."""
    from orchestrator import ec2

    cfg = _require_ec2(_load(config))
    inst = ec2.stop(ec2.client(cfg.ec2), cfg.ec2, log=env.log)
    env.out.print(f"{inst.instance_id} {inst.state}")


def _require_ec2(cfg: Any) -> Any:
    from orchestrator.errors import ConfigError

    if cfg.target != "ec2":
        raise ConfigError(f"this command needs target: ec2 (the config says {cfg.target})")
    return cfg


@app.command()
def trust(config: str = ConfigOpt) -> None:
    """Connect once, accepting the machine's SSH host key into known_hosts (check the
    fingerprint it prints against the instance's console first)."""
    from orchestrator.target import open_remote

    with open_remote(_load(config), trust_new_host=True, log=env.log) as remote:
        env.out.print(f"trusted {remote.host}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def deploy(
    ctx: typer.Context,
    config: str = ConfigOpt,
    run_id: str | None = typer.Option(None, "--run-id", help="name of the run (default: time-sortable id)"),
    sync_data: bool = typer.Option(False, "--sync-data", help="upload data.local_dir first (changed files only)"),
    force: bool = typer.Option(False, "--force", help="start even if another run is still running"),
    json_out: bool = JsonOpt,
    trust_new_host: bool = TrustOpt,
) -> None:
    """Ship the trainer and start training, detached. Trainer options go after `--`:
    `orch deploy -- --epochs 50 --split speaker`."""
    from orchestrator.deploy import deploy as run_deploy

    launched = run_deploy(_load(config), run_id=run_id, with_data=sync_data, force=force,
                          trainer_args=ctx.args, trust_new_host=trust_new_host, log=env.log)
    if json_out:
        env.out.print_json(json.dumps(launched.to_json()))
    else:
        env.out.print(f"run {launched.run_id} started on {launched.host} (pid {launched.pid}); "
                      f"watch it with: orch monitor {launched.run_id}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command; OrchError -> one line on stderr and its exit code."""
    import click

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="orch", standalone_mode=False)
        code = int(result) if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = ExitCode.USAGE
    except (click.exceptions.Abort, KeyboardInterrupt):
        env.err.print("orch: interrupted")
        code = ExitCode.INTERRUPTED
    except OrchError as exc:
        if debug:
            raise
        env.err.print(f"orch: error: {_one_line(str(exc))}", markup=False)
        code = exc.exit_code
    except Exception as exc:
        if debug:
            raise
        env.err.print(f"orch: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
                      "(run with --debug for the traceback)", markup=False)
        code = ExitCode.ERROR
    if argv is None:
        sys.exit(int(code))
    return int(code)


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


if __name__ == "__main__":  # pragma: no cover
    main()
