"""``orch``: parse, call one core function, render. Errors are mapped to exit codes in
:func:`main` and nowhere else (the codes: trainer/exitcodes.py, shared with the trainer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from orchestrator import __version__
from orchestrator.errors import ExitCode, OrchError
from trainer.exitcodes import help_table

app = typer.Typer(
    name="orch",
    help="Train on a remote EC2 GPU box without hand-written deploy/monitor/download scripts.\n\n"
    "Every command reads deploy.yaml (-c FILE or $ORCH_CONFIG to choose another, before or after "
    "the command); `target: local` runs the same flow on this machine.",
    epilog="Exit codes (the same for orch and python -m trainer):\n\n" + help_table("orch"),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate deploy.yaml or print its JSON schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOpt = typer.Option(None, "--config", "-c", envvar="ORCH_CONFIG", show_default=False,
                         help="the configuration file (default: deploy.yaml)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of text")
TrustOpt = typer.Option(False, "--trust-new-host",
                        help="accept an unknown SSH host key (it is shown) and remember it")
AllowCpuOpt = typer.Option(False, "--allow-cpu", help="launch even though TensorFlow sees none of the GPUs "
                           "nvidia-smi lists (training on the CPU of a GPU box)")
AutostopOpt = typer.Option(None, "--autostop", metavar="MINUTES|off", show_default=False,
                           help="run autostop.command (default: shut the machine down) once no run has been "
                           "active this many minutes; `off` disarms (default: deploy.yaml's autostop)")
FollowOpt = typer.Option(False, "--follow", "-f", help="then monitor the run to its end; the exit code "
                         "says how it ended (as `orch monitor`)")
RunArg = typer.Argument(None, help="the run: its id or any unique prefix of it (default: the latest)",
                        show_default=False)


class Env:
    """Where output goes; tests swap the consoles. Markup is off: paths and run ids are shown
    as they are, brackets included."""

    def __init__(self) -> None:
        from rich.console import Console

        self.out = Console(highlight=False, soft_wrap=True, markup=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

    def log(self, message: str) -> None:
        from rich.text import Text

        self.err.print(Text.assemble(("orch:", "dim"), " ", message))


env = Env()


def _version(value: bool) -> None:
    if value:
        env.out.print(f"orch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: str | None = ConfigOpt,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors"),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="print orch's version"),
) -> None:
    """(--debug is read by main())"""
    ctx.obj = {"config": config}


def _load(ctx: typer.Context, config: str | None) -> Any:
    """deploy.yaml from -c after the command, else -c before it (or $ORCH_CONFIG), else ./deploy.yaml."""
    from orchestrator.config import load_config

    root = ctx.find_root().obj or {}
    return load_config(config or root.get("config") or "deploy.yaml")


@app.command("version")
def version_cmd() -> None:
    """Print orch's version."""
    env.out.print(f"orch {__version__}")


@config_app.command("check")
def config_check(ctx: typer.Context, config: str | None = ConfigOpt) -> None:
    """Validate the file and print the resolved configuration (defaults filled in)."""
    _print_json(_load(ctx, config).model_dump(mode="json"))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of deploy.yaml (every key: type, default, description)."""
    from orchestrator.config import json_schema

    _print_json(json_schema())


@app.command()
def up(ctx: typer.Context, config: str | None = ConfigOpt) -> None:
    """Start the EC2 instance and wait until it runs."""
    from orchestrator import ec2
    from orchestrator.status import require_ec2

    cfg = _load(ctx, config)
    require_ec2(cfg)
    inst = ec2.ensure_running(ec2.client(cfg.ec2), cfg.ec2, allow_start=True, log=env.log)
    env.out.print(f"{inst.instance_id} {inst.state} {inst.address or '(no public address)'}")


@app.command()
def down(
    ctx: typer.Context,
    config: str | None = ConfigOpt,
    force: bool = typer.Option(False, "--force", help="stop it even while a run is active (the run dies; "
                               "`orch resume RUN --continue` picks it up later)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation on a terminal"),
    trust_new_host: bool = TrustOpt,
) -> None:
    """Stop the EC2 instance (its disk, runs and data stay). Refuses while a run is active."""
    from orchestrator.status import down as run_down

    confirm = None if yes or not sys.stdin.isatty() else (lambda question: typer.confirm(question, default=False))
    inst = run_down(_load(ctx, config), force=force, confirm=confirm, trust_new_host=trust_new_host, log=env.log)
    if inst is None:
        env.out.print("left running")
        raise typer.Exit(int(ExitCode.INTERRUPTED))
    env.out.print(f"{inst.instance_id} {inst.state}")


@app.command()
def trust(ctx: typer.Context, config: str | None = ConfigOpt) -> None:
    """Connect once and remember the machine's SSH host key in known_hosts. Check the
    fingerprint it shows (for EC2: against the instance's console output) first."""
    from orchestrator.target import trust_host

    key = trust_host(_load(ctx, config), log=env.log)
    env.out.print(f"{'trusted' if key.added else 'already trusted'} {key.host}: {key.kind} {key.fingerprint} "
                  f"({key.known_hosts})")


@app.command(context_settings={"allow_extra_args": True})
def deploy(
    ctx: typer.Context,
    config: str | None = ConfigOpt,
    run_id: str | None = typer.Option(None, "--run-id", help="name of the run (default: time-sortable id)"),
    sync_data: bool = typer.Option(False, "--sync-data", help="upload data.local_dir first (changed files only)"),
    force: bool = typer.Option(False, "--force", help="start even if another run is still running"),
    allow_cpu: bool = AllowCpuOpt,
    autostop: str | None = AutostopOpt,
    follow: bool = FollowOpt,
    json_out: bool = JsonOpt,
    trust_new_host: bool = TrustOpt,
) -> int:
    """Ship the trainer and start training, detached. Trainer options go after `--`:
    `orch deploy -- --epochs 50 --split speaker` (checked before anything is launched)."""
    from orchestrator.deploy import deploy as run_deploy

    cfg = _load(ctx, config)
    launched = run_deploy(cfg, run_id=run_id, with_data=sync_data, force=force, allow_cpu=allow_cpu, autostop=autostop,
                          trainer_args=ctx.args, trust_new_host=trust_new_host, log=env.log)
    _show_launched(launched, json_out)
    return _follow(cfg, launched.run_id, trust_new_host) if follow else 0


def _show_launched(launched: Any, json_out: bool, how: str = "") -> None:
    if json_out:
        _print_json(launched.to_json())
    else:
        env.out.print(f"run {launched.run_id} started on {launched.host} (pid {launched.pid}{how}; code version "
                      f"{launched.code_version}); watch it with: orch monitor {launched.run_id}")


def _print_json(obj: Any) -> None:
    env.out.print_json(json.dumps(obj))


def _recipe_help(name: str) -> str:
    from trainer.options import extension_help

    return extension_help(name)


@app.command()
def resume(
    ctx: typer.Context,
    run: str | None = typer.Argument(None, help="the run to extend or continue (an id or unique prefix; "
                                     "default: the best finished run)", show_default=False),
    config: str | None = ConfigOpt,
    # Ranges are the trainer's own (trainer/options.py), checked before anything connects.
    epochs: int | None = typer.Option(None, "--epochs", help=_recipe_help("epochs"), show_default=False),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help=_recipe_help("learning_rate"),
                                               show_default=False),
    warmup_epochs: int | None = typer.Option(None, "--warmup-epochs", help=_recipe_help("warmup_epochs"),
                                             show_default=False),
    in_place: bool = typer.Option(False, "--continue", help="restart a killed/stopped RUN in place, from its "
                                  "last committed epoch (the spot-interruption case)"),
    force: bool = typer.Option(False, "--force", help="start even if another run is still running"),
    allow_cpu: bool = AllowCpuOpt,
    autostop: str | None = AutostopOpt,
    follow: bool = FollowOpt,
    json_out: bool = JsonOpt,
    trust_new_host: bool = TrustOpt,
) -> int:
    """Extended training from a finished run's best checkpoint: a new run with the same
    architecture, statistics and split, a lower learning rate and more epochs. With --follow
    its last line says whether it beat its parent, and by how much."""
    from orchestrator.deploy import resume as run_resume

    cfg = _load(ctx, config)
    launched = run_resume(cfg, run, epochs=epochs, learning_rate=learning_rate,
                          warmup_epochs=warmup_epochs, in_place=in_place, force=force, allow_cpu=allow_cpu,
                          autostop=autostop,
                          trust_new_host=trust_new_host, log=env.log)
    _show_launched(launched, json_out, "; continued" if in_place else f"; extends {launched.extra.get('parent')}")
    return _follow(cfg, launched.run_id, trust_new_host) if follow else 0


@app.command()
def monitor(
    ctx: typer.Context,
    run: str | None = RunArg,
    config: str | None = ConfigOpt,
    once: bool = typer.Option(False, "--once", help="print one snapshot and exit"),
    json_out: bool = typer.Option(False, "--json", help="print the snapshot as one JSON object (implies --once)"),
    interval: float = typer.Option(5.0, "--interval", min=0.2, help="seconds between refreshes"),
    trust_new_host: bool = TrustOpt,
) -> int:
    """Live view of a run: epochs, accuracy, trends, GPUs, log. Exits when the run ends, with
    0 finished, 8 failed, 9 stopped, 10 died. Ctrl-C leaves the run untouched."""
    from orchestrator.monitor import monitor as run_monitor

    cfg = _load(ctx, config)
    if json_out or once:
        view = run_monitor(cfg, run, once=True, trust_new_host=trust_new_host, log=env.log)
        if json_out:
            _print_json(view.to_json())
        else:
            env.out.print(view.render())
        return int(view.exit_code)
    return _follow(cfg, run, trust_new_host, interval)


def _follow(cfg: Any, run: str | None, trust_new_host: bool, interval: float = 2.0) -> int:
    """The live monitor view until the run ends; its last line and exit code say how."""
    from rich.live import Live

    from orchestrator.monitor import monitor as run_monitor

    with Live(console=env.out, auto_refresh=False, transient=False) as live:
        view = run_monitor(cfg, run, interval=interval, trust_new_host=trust_new_host, log=env.log,
                           show=lambda v: live.update(v.render(), refresh=True))
    env.out.line()
    env.out.print(view.summary())
    return int(view.exit_code)


@app.command()
def download(
    ctx: typer.Context,
    run: str | None = typer.Argument(None, help="the run, an id or unique prefix (default: the finished run "
                                     "with the best val accuracy)", show_default=False),
    config: str | None = ConfigOpt,
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

        got = run_download(_load(ctx, config), run, latest=latest, dest=dest, progress=progress,
                           trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(got.to_json())
        return
    acc = f"{got.best_val_accuracy:.4f}" if got.best_val_accuracy is not None else "n/a"
    env.out.print(f"run {got.run_id}: best val_accuracy {acc}; {len(got.fetched)} files fetched, "
                  f"{len(got.already_there)} already there, in {got.dest}")


@app.command("runs")
def runs_cmd(ctx: typer.Context, config: str | None = ConfigOpt, json_out: bool = JsonOpt,
             trust_new_host: bool = TrustOpt) -> None:
    """All runs on the machine: state, epochs, best val accuracy, parent and how the run
    compares with it, start, duration. Run ids are shown whole."""
    from orchestrator.runs import list_runs, runs_table

    cfg = _load(ctx, config)
    runs = list_runs(cfg, trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(runs)
    elif not runs:
        env.out.print("no runs yet; start one with `orch deploy`")
    else:
        _print_table(runs_table(runs))


def _print_table(table: Any) -> None:
    """A table on the terminal as wide as it is; in a pipe as wide as the table needs (never cut)."""
    from rich.console import Console

    console = env.out
    if not console.is_terminal:
        console = Console(file=console.file, width=10_000, highlight=False, markup=False)
    console.print(table)


@app.command()
def status(ctx: typer.Context, config: str | None = ConfigOpt, json_out: bool = JsonOpt,
           trust_new_host: bool = TrustOpt) -> int:
    """The machine: instance type, state, uptime and cost, GPUs (or CPU load), the active run,
    autostop. Never starts the instance: a stopped one exits 11."""
    from orchestrator.status import machine_status

    st = machine_status(_load(ctx, config), trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(st.to_json())
    else:
        _render_status(st)
    if st.stopped:
        assert st.instance is not None
        env.err.print(f"orch: instance {st.instance.id} is {st.instance.state}; `orch up` starts it")
        return int(ExitCode.INSTANCE_STOPPED)
    return 0


def _render_status(st: Any) -> None:
    from orchestrator.autostop import describe
    from orchestrator.monitor import describe_load

    if st.instance is not None:
        i = st.instance
        env.out.print(f"instance {i.id} ({i.type}{', spot' if i.spot else ''}): {i.state}, address {i.address or '-'}")
        env.out.print(f"  cost: {i.cost.describe()}")
    if st.machine is None:
        return
    env.out.print(f"host {st.host}")
    for g in st.machine.host.gpus:
        env.out.print(f"  GPU {g.index} {g.name}: {g.utilization}% util, {g.memory_used}/{g.memory_total} MiB, "
                      f"{g.temperature} °C, {g.power} W")
    if not st.machine.host.gpus:
        env.out.print(f"  {describe_load(st.machine.host)}")
    active = [r for r in st.machine.runs if r.active]
    for r in active:
        env.out.print(f"  running: {r.run_id} epoch {r.epoch}/{r.epochs}, best {r.best_val_accuracy}")
    if not active:
        env.out.print("  no run is running")
    env.out.print(f"  {describe(st.machine.autostop)}")


@app.command()
def doctor(ctx: typer.Context, config: str | None = ConfigOpt, json_out: bool = JsonOpt) -> int:
    """Every check a first day needs, in order, each ok or failed with the fix: config, AWS,
    instance, SSH and host key, Python, TensorFlow and the GPUs it sees, CUDA driver, data,
    disk. Never starts the instance. Exit 0 only if all pass (else 12)."""
    from dataclasses import asdict

    from orchestrator.doctor import doctor as run_doctor

    root = ctx.find_root().obj or {}
    results = run_doctor(config or root.get("config") or "deploy.yaml", log=env.log)
    ok = all(r.ok for r in results)
    if json_out:
        _print_json({"ok": ok, "checks": [asdict(r) | {"exit_code": int(r.exit_code)} for r in results]})
    else:
        from rich.table import Table

        table = Table("check", "", "detail", "fix", show_lines=False)
        for r in results:
            table.add_row(r.check, "ok" if r.ok else "FAILED", r.detail, "" if r.ok else r.fix)
        _print_table(table)
    return 0 if ok else int(ExitCode.NOT_READY)


@app.command()
def logs(
    ctx: typer.Context,
    run: str | None = RunArg,
    config: str | None = ConfigOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the run ends"),
    trust_new_host: bool = TrustOpt,
) -> None:
    """Print (or follow) a run's train.log."""
    from orchestrator.runs import logs as run_logs

    run_logs(_load(ctx, config), run, follow=follow, trust_new_host=trust_new_host, log=env.log,
             write=lambda text: (sys.stdout.write(text), sys.stdout.flush()))


@app.command()
def stop(
    ctx: typer.Context,
    run: str | None = typer.Argument(None, help="the run, an id or unique prefix (default: the one running)",
                                     show_default=False),
    config: str | None = ConfigOpt,
    json_out: bool = JsonOpt,
    trust_new_host: bool = TrustOpt,
) -> int:
    """Stop a run: SIGTERM, the trainer saves and marks it stopped; reports the final state."""
    from orchestrator.monitor import EXIT_CODES
    from orchestrator.runs import stop as run_stop

    final = run_stop(_load(ctx, config), run, trust_new_host=trust_new_host, log=env.log)
    if json_out:
        _print_json(final)
    else:
        env.out.print(f"run {final['run_id']} {final['state']} at epoch {final.get('epoch')}/{final.get('epochs')}")
    return 0 if final["state"] == "stopped" else int(EXIT_CODES.get(final["state"] or "", 1))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command; every error -> one line on stderr and its exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="orch", standalone_mode=False)
        code = int(result) if isinstance(result, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except SystemExit as exc:  # typer's completion options exit by themselves
        code = exc.code if isinstance(exc.code, int) else 0
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        code = _usage_error(exc)
    except (typer.Abort, KeyboardInterrupt):
        env.err.print("orch: interrupted")
        code = ExitCode.INTERRUPTED
    except OrchError as exc:
        if debug:
            raise
        env.err.print(f"orch: error: {_one_line(str(exc))}")
        code = exc.exit_code
    except Exception as exc:
        if debug:
            raise
        env.err.print(f"orch: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
                      "(a bug: run with --debug for the traceback and report it)")
        code = ExitCode.ERROR
    if argv is None:
        sys.exit(int(code))
    return int(code)


def _usage_error(exc: Any) -> int:
    """A command-line mistake: one line saying what and where to look (bare `orch` and a
    bare group print their help instead)."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        env.out.print(ctx.get_help())
        return ExitCode.USAGE
    where = ctx.command_path if ctx is not None else "orch"
    env.err.print(f"orch: error: {_one_line(exc.format_message())} (see `{where} --help`)")
    return ExitCode.USAGE


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


if __name__ == "__main__":  # pragma: no cover
    main()
