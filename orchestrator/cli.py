"""``orch``: parse, call one core function, render. Errors are mapped to exit codes in
:func:`main` and nowhere else."""

from __future__ import annotations

import json
import sys
from pathlib import Path
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
        from rich.markup import escape

        # Messages hold paths and names ("[/x]" in one made rich raise): never markup.
        self.err.print(f"[dim]orch:[/dim] {escape(message)}")


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
    _print_json(cfg.model_dump(mode="json"))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of deploy.yaml (for editor completion)."""
    from orchestrator.config import json_schema

    _print_json(json_schema())


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
    _show_launched(launched, json_out)


def _show_launched(launched: Any, json_out: bool, how: str = "") -> None:
    if json_out:
        _print_json(launched.to_json())
    else:
        env.out.print(f"run {launched.run_id} started on {launched.host} (pid {launched.pid}{how}); "
                      f"watch it with: orch monitor {launched.run_id}")


def _print_json(obj: Any) -> None:
    env.out.print_json(json.dumps(obj))


@app.command()
def resume(
    run: str | None = typer.Argument(None, help="the run to extend (default: the best finished run)"),
    config: str = ConfigOpt,
    epochs: int | None = typer.Option(None, "--epochs", help="epochs of the new run (default 100)"),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="default: half the parent's"),
    warmup_epochs: int | None = typer.Option(None, "--warmup-epochs", help="default 1"),
    in_place: bool = typer.Option(False, "--continue", help="restart a killed/stopped RUN in place, from its "
                                  "last finished epoch (the spot-interruption case)"),
    force: bool = typer.Option(False, "--force", help="start even if another run is still running"),
    json_out: bool = JsonOpt,
    trust_new_host: bool = TrustOpt,
) -> None:
    """Extended training from a finished run's best checkpoint: a new run with the same
    architecture, statistics and split, a lower learning rate and more epochs."""
    from orchestrator.deploy import resume as run_resume

    launched = run_resume(_load(config), run, epochs=epochs, learning_rate=learning_rate,
                          warmup_epochs=warmup_epochs, in_place=in_place, force=force,
                          trust_new_host=trust_new_host, log=env.log)
    _show_launched(launched, json_out, "; continued" if in_place else f"; extends {launched.extra.get('parent')}")


@app.command()
def monitor(
    run: str | None = typer.Argument(None, help="the run (default: the latest)"),
    config: str = ConfigOpt,
    once: bool = typer.Option(False, "--once", help="print one snapshot and exit"),
    json_out: bool = typer.Option(False, "--json", help="print the snapshot as one JSON object (implies --once)"),
    interval: float = typer.Option(5.0, "--interval", min=0.2, help="seconds between refreshes"),
    trust_new_host: bool = TrustOpt,
) -> int:
    """Live view of a run: epochs, accuracy, trends, GPUs, log. Exits when the run ends, with
    0 finished, 8 failed, 9 stopped, 10 died. Ctrl-C leaves the run untouched."""
    from rich.live import Live

    from orchestrator.monitor import monitor as run_monitor

    cfg = _load(config)
    if json_out or once:
        view = run_monitor(cfg, run, once=True, trust_new_host=trust_new_host, log=env.log)
        if json_out:
            _print_json(view.to_json())
        else:
            env.out.print(view.render())
        return int(view.exit_code)
    with Live(console=env.out, auto_refresh=False, transient=False) as live:
        view = run_monitor(cfg, run, interval=interval, trust_new_host=trust_new_host, log=env.log,
                           show=lambda v: live.update(v.render(), refresh=True))
    env.out.line()
    env.out.print(view.summary())
    return int(view.exit_code)


@app.command()
def download(
    run: str | None = typer.Argument(None, help="the run (default: the finished run with the best val accuracy)"),
    config: str = ConfigOpt,
    best: bool = typer.Option(True, "--best",
                              help="the best checkpoint and the stats files (what MANIFEST.sha256 lists)"),
    latest: bool = typer.Option(False, "--latest", help="the newest run instead of the best one"),
    dest: Path = typer.Option(Path("artifacts"), "--dest", help="files go to DEST/<run_id>/"),
    json_out: bool = JsonOpt,
    trust_new_host: bool = TrustOpt,
) -> None:
    """Bring back a run's best checkpoint and stats files, each checked against the run's
    MANIFEST.sha256 and written atomically; files already here and correct are kept."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from orchestrator.download import download as run_download

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=env.err, transient=True,
                  disable=json_out or not env.err.is_terminal) as bar:  # no stray blank line in logs
        task = bar.add_task("downloading", total=None)

        def progress(rel: str, done: int, total: int) -> None:
            bar.update(task, description=rel, completed=done, total=total)

        got = run_download(_load(config), run, latest=latest, dest=dest, progress=progress,
                           trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(got.to_json())
        return
    acc = f"{got.best_val_accuracy:.4f}" if got.best_val_accuracy is not None else "n/a"
    env.out.print(f"run {got.run_id}: best val_accuracy {acc}; {len(got.fetched)} files fetched, "
                  f"{len(got.already_there)} already there, in {got.dest}")


@app.command("runs")
def runs_cmd(config: str = ConfigOpt, json_out: bool = JsonOpt, trust_new_host: bool = TrustOpt) -> None:
    """All runs on the machine: state, epochs, best val accuracy, parent, start, duration."""
    from rich.table import Table

    from orchestrator.runs import list_runs

    runs = list_runs(_load(config), trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(runs)
        return
    table = Table("run", "parent", "state", "epoch", "best val acc", "started", "duration")
    for r in runs:
        best = r.get("best_val_accuracy")
        table.add_row(r["run_id"], r.get("parent") or "", str(r["state"]), f"{r.get('epoch')}/{r.get('epochs')}",
                      f"{best:.4f}" if best is not None else "-", (r.get("started_at") or "")[:19],
                      f"{r['seconds'] / 60:.1f} min" if r.get("seconds") is not None else "")
    env.out.print(table)


@app.command()
def status(config: str = ConfigOpt, json_out: bool = JsonOpt, trust_new_host: bool = TrustOpt) -> None:
    """The machine: instance state and address, GPUs (or CPU load), the active run."""
    from orchestrator.runs import machine_status

    st = machine_status(_load(config), trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(st)
        return
    if "instance" in st:
        i = st["instance"]
        env.out.print(f"instance {i['id']}: {i['state']}, address {i['address'] or '-'}")
        if "host" not in st:
            return
    env.out.print(f"host {st['host']}")
    for g in st["gpus"]:
        env.out.print(f"  GPU {g['index']} {g['name']}: {g['utilization']}% util, "
                      f"{g['memory_used']}/{g['memory_total']} MiB, {g['temperature']} °C, {g['power']} W")
    if not st["gpus"]:
        env.out.print(f"  no GPU ({st['gpu_error']}); load {st['load'].get('loadavg')}")
    for r in st["active_runs"]:
        env.out.print(f"  running: {r['run_id']} epoch {r['epoch']}/{r['epochs']}, best {r['best_val_accuracy']}")
    if not st["active_runs"]:
        env.out.print("  no run is running")


@app.command()
def logs(
    run: str | None = typer.Argument(None, help="the run (default: the latest)"),
    config: str = ConfigOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the run ends"),
    trust_new_host: bool = TrustOpt,
) -> None:
    """Print (or follow) a run's train.log."""
    from orchestrator.runs import logs as run_logs

    run_logs(_load(config), run, follow=follow, trust_new_host=trust_new_host, log=env.log,
             write=lambda text: (sys.stdout.write(text), sys.stdout.flush()))


@app.command()
def stop(
    run: str | None = typer.Argument(None, help="the run (default: the one running)"),
    config: str = ConfigOpt,
    json_out: bool = JsonOpt,
    trust_new_host: bool = TrustOpt,
) -> int:
    """Stop a run: SIGTERM, the trainer saves and marks it stopped; reports the final state."""
    from orchestrator.monitor import EXIT_CODES
    from orchestrator.runs import stop as run_stop

    final = run_stop(_load(config), run, trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(final)
    else:
        env.out.print(f"run {final['run_id']} {final['state']} at epoch {final.get('epoch')}/{final.get('epochs')}")
    return 0 if final["state"] == "stopped" else int(EXIT_CODES.get(final["state"] or "", 1))


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
