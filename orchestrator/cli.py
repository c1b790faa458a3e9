"""``orch``: parse, call one core function, render. Errors are mapped to exit codes in
:func:`main` and nowhere else (the codes: trainer/contract/exitcodes.py, shared with the trainer).

No module-global state: :func:`main` builds an :class:`Invocation` (where output goes, --debug,
a -c given before the command) and every command gets a :class:`~orchestrator.context.Context`
built from it; tests pass their own ``Output`` to :func:`main`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from orchestrator import __version__
from orchestrator.context import Context, Output, Trust
from orchestrator.errors import ConfigError, ExitCode, OrchError
from orchestrator.requests import Extension, LaunchOptions
from orchestrator.terminal import clean
from trainer.contract import options
from trainer.contract.exitcodes import help_table
from trainer.contract.wire import accuracy_text

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
notify_app = typer.Typer(help="Run notifications (deploy.yaml's notify: webhook).", no_args_is_help=True)
app.add_typer(notify_app, name="notify")
sweep_app = typer.Typer(help="Hyperparameter sweeps: an Optuna study whose trials are orch runs.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")


def _flags_take_no_value() -> None:
    """typer shows a boolean flag's type (`--json <bool>`) as if the flag took a value: in
    orch's help a flag shows none (the one place help is rendered, so patched once here)."""
    option = typer.core.TyperOption
    shown = option.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    option.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()


@dataclass
class Invocation:
    """One run of `orch`: where output goes, --debug, and a -c given before the command."""

    output: Output
    debug: bool = False
    config: str | None = None


# $ORCH_CONFIG is read once, by the option before the command: a -c anywhere on the command
# line wins over it (after the command: over a -c before it too).
RootConfigOpt = typer.Option(None, "--config", "-c", envvar="ORCH_CONFIG", show_default=False,
                             help="the configuration file (default: $ORCH_CONFIG, else deploy.yaml)")
ConfigOpt = typer.Option(None, "--config", "-c", show_default=False,
                         help="the configuration file (default: $ORCH_CONFIG, else deploy.yaml)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of text")


def _complete_run(typer_ctx: typer.Context, incomplete: str) -> list[str]:
    """Run ids for the shell: cached by `orch runs`, or the machine's when it answers at once
    (orchestrator/completion.py); never an instance started, never an error."""
    from orchestrator.completion import run_ids

    config = typer_ctx.params.get("config") or typer_ctx.find_root().params.get("config")
    return run_ids(config or os.environ.get("ORCH_CONFIG") or "deploy.yaml", incomplete)


RunArg = typer.Argument(None, help="the run: its id or any unique prefix of it (default: the latest)",
                        show_default=False, autocompletion=_complete_run)

# The options every command that talks to the machine takes, and those of the commands that
# launch a run, each declared ONCE (uses_machine adds them to a command's signature).
SHARED: dict[str, tuple[Any, Any]] = {
    "config": (str | None, ConfigOpt),
    "trust_new_host": (bool, typer.Option(False, "--trust-new-host",
                                          help="accept an unknown SSH host key (it is shown) and remember it")),
}
LAUNCHING: dict[str, tuple[Any, Any]] = {
    "force": (bool, typer.Option(False, "--force", help="start even if another run is still running")),
    "allow_cpu": (bool, typer.Option(False, "--allow-cpu", help="launch even though TensorFlow sees none of the "
                                     "GPUs nvidia-smi lists (training on the CPU of a GPU box)")),
    "autostop": (str | None, typer.Option(None, "--autostop", metavar="MINUTES|off", show_default=False,
                                          help="run autostop.command (default: shut the machine down) once no run "
                                          "has been active this many minutes; `off` disarms (default: "
                                          "deploy.yaml's autostop)")),
    "follow": (bool, typer.Option(False, "--follow", "-f", help="then monitor the run to its end; the exit code "
                                  "says how it ended (as `orch monitor`)")),
}


def _invocation(typer_ctx: typer.Context) -> Invocation:
    return typer_ctx.find_root().obj


def _config_path(typer_ctx: typer.Context, config: str | None) -> str:
    """-c after the command, else -c before it, else $ORCH_CONFIG, else ./deploy.yaml."""
    return config or _invocation(typer_ctx).config or "deploy.yaml"


def uses_machine(func: Callable[..., Any] | None = None, *, launches: bool = False) -> Any:
    """A command that talks to the machine: its options get -c and --trust-new-host (and, with
    ``launches``, --force, --allow-cpu, --autostop, --follow), and it is called with the
    :class:`Context` first (and ``launching=LaunchOptions``, ``follow`` for a launching command;
    a ``trainer_args`` parameter gets the arguments after `--`)."""
    if func is None:
        return functools.partial(uses_machine, launches=launches)
    extra = SHARED | (LAUNCHING if launches else {})
    hints = typing.get_type_hints(func)
    given = inspect.signature(func).parameters
    injected = {"ctx", "trainer_args"} | ({"launching", "follow"} if launches else set())
    clash = (set(given) - injected) & set(extra)
    assert not clash, f"{func.__name__}: {clash} are shared options, declared once above"
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
           for p in given.values() if p.name not in injected]
    wants_args = "trainer_args" in given
    params = [inspect.Parameter("typer_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context), *own,
              *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                for name, (kind, option) in extra.items())]

    @functools.wraps(func)
    def command(*, typer_ctx: typer.Context, **kwargs: Any) -> Any:
        shared = {name: kwargs.pop(name) for name in extra}
        invocation = _invocation(typer_ctx)
        from orchestrator.config import load_config

        ctx = Context(load_config(_config_path(typer_ctx, shared["config"])), invocation.output,
                      Trust(accept_new=shared["trust_new_host"]), invocation.debug)
        if launches:
            kwargs |= {"launching": LaunchOptions(shared["force"], shared["allow_cpu"], shared["autostop"]),
                       "follow": shared["follow"]}
        if wants_args:
            kwargs["trainer_args"] = list(typer_ctx.args)
        return func(ctx, **kwargs)

    command.__signature__ = inspect.Signature(params, return_annotation=hints.get("return"))  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _out(ctx: Context) -> Any:
    assert ctx.output is not None
    return ctx.output.out


def _print_json(console: Any, obj: Any) -> None:
    """JSON as it is: its strings are data, every control character in them written escaped."""
    console.print_json(json.dumps(obj), ensure_ascii=True)


def _say(console: Any, text: Any) -> None:
    """One line (or a renderable built from cleaned text); a str is cleaned of escape sequences first."""
    console.print(clean(text) if isinstance(text, str) else text)


def _print_table(console: Any, table: Any) -> None:
    """A table on the terminal as wide as it is; in a pipe as wide as the table needs (never cut)."""
    from rich.console import Console

    if not console.is_terminal:
        console = Console(file=console.file, width=10_000, highlight=False, markup=False)
    console.print(table)


def _version(typer_ctx: typer.Context, value: bool) -> None:
    if value:
        typer_ctx.find_root().obj.output.out.print(f"orch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    typer_ctx: typer.Context,
    config: str | None = RootConfigOpt,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks on errors"),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="print orch's version"),
) -> None:
    """(--debug is read by main())"""
    _invocation(typer_ctx).config = config


@app.command("version")
def version_cmd(typer_ctx: typer.Context) -> None:
    """Print orch's version."""
    _invocation(typer_ctx).output.out.print(f"orch {__version__}")


@config_app.command("check")
def config_check(typer_ctx: typer.Context, config: str | None = ConfigOpt) -> None:
    """Validate the file and print the resolved configuration (defaults filled in)."""
    from orchestrator.config import load_config

    cfg = load_config(_config_path(typer_ctx, config))
    _print_json(_invocation(typer_ctx).output.out, cfg.model_dump(mode="json"))


@config_app.command("schema")
def config_schema(typer_ctx: typer.Context, config: str | None = ConfigOpt) -> None:  # -c accepted, not needed
    """Print the JSON schema of deploy.yaml (every key: type, default, description)."""
    from orchestrator.config import json_schema

    _print_json(_invocation(typer_ctx).output.out, json_schema())


@app.command()
@uses_machine
def up(ctx: Context) -> None:
    """Start the EC2 instance, or create it from deploy.yaml's ec2.launch when none is named
    ec2.name, and wait until it runs and answers SSH (a new host key is trusted only when it
    matches the instance's console output). Running twice creates nothing more. An armed
    autostop is watched again."""
    from orchestrator.status import up as run_up

    inst = run_up(ctx)
    _say(_out(ctx), f"{inst.id} {inst.state} {inst.address or '(no public address)'}")


@app.command()
@uses_machine
def down(
    ctx: Context,
    force: bool = typer.Option(False, "--force", help="stop (or terminate) it even while a run is active (the "
                               "run dies; after a stop, `orch resume RUN --continue` picks it up later)"),
    terminate: bool = typer.Option(False, "--terminate", help="terminate the instance instead of stopping it: it "
                                   "and its disk (code, envs, data, every run on it) are deleted; asks first "
                                   "(without a terminal, pass -y)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation (needed without a terminal "
                             "for --terminate, and to stop a machine orch cannot reach)"),
) -> None:
    """Stop the EC2 instance (its disk, runs and data stay), or --terminate it. Refuses while a
    run is active. When the machine does not answer within ssh.connect_timeout (15 s at most),
    it says so and asks; -y stops it through EC2 anyway."""
    from orchestrator.status import Consent
    from orchestrator.status import down as run_down

    terminal = ctx.output is not None and ctx.output.stdin_isatty
    consent = Consent(yes, (lambda question: typer.confirm(question, default=False)) if terminal else None)
    inst = run_down(ctx, force=force, terminate=terminate, consent=consent)
    if inst is None:
        _say(_out(ctx), "left running")
        raise typer.Exit(int(ExitCode.INTERRUPTED))
    _say(_out(ctx), f"{inst.id} {inst.state}")


@app.command()
@uses_machine
def trust(ctx: Context) -> None:
    """Connect once and remember the machine's SSH host key in known_hosts. Check the
    fingerprint it shows (for EC2: against the instance's console output) first."""
    from orchestrator.provision import trust_host

    key = trust_host(ctx)
    _say(_out(ctx), f"{'trusted' if key.added else 'already trusted'} {key.host}: {key.kind} {key.fingerprint} "
                    f"({key.known_hosts})")


@app.command(context_settings={"allow_extra_args": True})
@uses_machine(launches=True)
def deploy(
    ctx: Context,
    run_id: str | None = typer.Option(None, "--run-id", help="name of the run (default: time-sortable id)"),
    sync_data: bool = typer.Option(False, "--sync-data", help="upload data.local_dir first (changed files only)"),
    recover: bool = typer.Option(False, "--recover", help="then stay with the run to its end (as --follow) and "
                                 "recover it when EC2 takes its spot instance: started again, or replaced from "
                                 "ec2.launch and restored from storage (deploy.yaml's recover: bounds it)"),
    json_out: bool = JsonOpt,
    trainer_args: list[str] | None = None,
    launching: LaunchOptions | None = None,
    follow: bool = False,
) -> int:
    """Ship the trainer and start training, detached. Trainer options go after `--`:
    `orch deploy -- --epochs 50 --split speaker` (checked before anything is launched)."""
    from orchestrator.deploy import deploy as run_deploy
    from orchestrator.recover import check_recoverable

    if recover:
        if json_out:
            raise ConfigError("--recover shows the run live to its end; for a script, `orch deploy --json` then "
                              "`orch watch RUN`")
        check_recoverable(ctx)
    launched = run_deploy(ctx, run_id=run_id, with_data=sync_data, launching=launching, trainer_args=trainer_args or ())
    _show_launched(ctx, launched, json_out)
    if recover:
        return _watch(ctx, launched.run_id, created={launched.instance_id} if launched.created else set(),
                      launching=launching)
    return _follow(ctx, launched.run_id) if follow else 0


def _show_launched(ctx: Context, launched: Any, json_out: bool, how: str = "") -> None:
    if json_out:
        _print_json(_out(ctx), launched.to_json())
    else:
        _say(_out(ctx), f"run {launched.run_id} started on {launched.host} (pid {launched.pid}{how}; code version "
                        f"{launched.code_version}); watch it with: orch monitor {launched.run_id}")


def _recipe_help(name: str) -> str:
    from trainer.contract.options import extension_help

    return extension_help(name)


@app.command()
@uses_machine(launches=True)
def resume(
    ctx: Context,
    run: str | None = typer.Argument(None, help="the run to extend or continue (an id or unique prefix; "
                                     "default: the best finished run)", show_default=False,
                                     autocompletion=_complete_run),
    # Ranges are the trainer's own (trainer/contract/options.py), checked before anything connects.
    epochs: int | None = typer.Option(None, "--epochs", help=_recipe_help("epochs"), show_default=False),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help=_recipe_help("learning_rate"),
                                               show_default=False),
    warmup_epochs: int | None = typer.Option(None, "--warmup-epochs", help=_recipe_help("warmup_epochs"),
                                             show_default=False),
    in_place: bool = typer.Option(False, "--continue", help="restart a killed/stopped RUN in place, from its "
                                  "last committed epoch (the spot-interruption case)"),
    json_out: bool = JsonOpt,
    launching: LaunchOptions | None = None,
    follow: bool = False,
) -> int:
    """Extended training from a finished run's best checkpoint: a new run with the same
    architecture, statistics and split, a lower learning rate and more epochs. With --follow
    its last line says whether it beat its parent, and by how much."""
    from orchestrator.deploy import resume as run_resume

    launched = run_resume(ctx, run, extension=Extension(epochs, learning_rate, warmup_epochs), in_place=in_place,
                          launching=launching)
    _show_launched(ctx, launched, json_out, "; continued" if in_place else f"; extends {launched.extra.get('parent')}")
    return _follow(ctx, launched.run_id) if follow else 0


@app.command()
@uses_machine
def monitor(
    ctx: Context,
    run: str | None = RunArg,
    once: bool = typer.Option(False, "--once", help="print one snapshot and exit"),
    json_out: bool = typer.Option(False, "--json", help="print the snapshot as one JSON object (implies --once)"),
    interval: float = typer.Option(5.0, "--interval", min=0.2, max=3600, help="seconds between refreshes"),
) -> int:
    """Live view of a run: epochs, accuracy, trends, GPUs, log. Exits when the run ends, with
    0 finished, 8 failed, 9 stopped, 10 died. Ctrl-C leaves the run untouched."""
    from orchestrator.monitor import monitor as run_monitor

    if json_out or once:
        view = run_monitor(ctx, run, once=True)
        if json_out:
            _print_json(_out(ctx), view.to_json())
        else:
            _say(_out(ctx), view.render())
        return int(view.exit_code)
    return _follow(ctx, run, interval)


@app.command()
@uses_machine
def watch(
    ctx: Context,
    run: str | None = RunArg,
    allow_cpu: bool = typer.Option(False, "--allow-cpu", help="a continued run may train on the CPU of a GPU box "
                                   "whose GPUs TensorFlow cannot see (as deploy's --allow-cpu)"),
) -> int:
    """Stay with a run already going until it ends, and recover it when EC2 takes its
    (spot) instance, as `orch deploy --recover` does: only EC2's word counts, never one failed
    SSH probe; bounded by deploy.yaml's recover: section; each recovery recorded in the run.
    The exit code says how the run ended (as `orch monitor`)."""
    return _watch(ctx, run, launching=LaunchOptions(allow_cpu=allow_cpu))


def _watch(ctx: Context, run: str | None, created: set[str] | None = None,
           launching: LaunchOptions | None = None) -> int:
    from rich.live import Live

    from orchestrator.recover import watch as run_watch

    with Live(console=_out(ctx), auto_refresh=False, transient=False) as live:
        outcome = run_watch(ctx, run, created=created, launching=launching or LaunchOptions(),
                            show=lambda v: live.update(v.render(), refresh=True))
    _out(ctx).line()
    _say(_out(ctx), outcome.summary())
    return int(outcome.exit_code)


def _follow(ctx: Context, run: str | None, interval: float = 2.0) -> int:
    """The live monitor view until the run ends; its last line and exit code say how."""
    from rich.live import Live

    from orchestrator.monitor import monitor as run_monitor

    with Live(console=_out(ctx), auto_refresh=False, transient=False) as live:
        view = run_monitor(ctx, run, interval=interval, show=lambda v: live.update(v.render(), refresh=True))
    _out(ctx).line()
    _say(_out(ctx), view.summary())
    return int(view.exit_code)


@app.command()
@uses_machine
def download(
    ctx: Context,
    run: str | None = typer.Argument(None, help="the run, an id or unique prefix (default: the finished run "
                                     "with the best val accuracy)", show_default=False,
                                     autocompletion=_complete_run),
    best: bool = typer.Option(True, "--best",
                              help="the best checkpoint and the stats files (what MANIFEST.sha256 lists)"),
    latest: bool = typer.Option(False, "--latest", help="the newest run instead of the best one"),
    dest: Path = typer.Option(Path("artifacts"), "--dest", help="files go to DEST/<run_id>/"),
    json_out: bool = JsonOpt,
) -> None:
    """Bring back a run's best checkpoint and stats files, each checked against the run's
    MANIFEST.sha256 and written atomically; files already here and correct are kept. With
    `storage:`, from the S3 mirror when the machine cannot be reached or lacks the run."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from orchestrator.download import download as run_download

    assert ctx.output is not None
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=ctx.output.err, transient=True,
                  disable=json_out or not ctx.output.err.is_terminal) as bar:  # no stray blank line in logs
        task = bar.add_task("downloading", total=None)

        def progress(rel: str, done: int, total: int) -> None:
            bar.update(task, description=rel, completed=done, total=total)

        got = run_download(ctx, run, latest=latest, dest=dest, progress=progress)
    if json_out:
        _print_json(_out(ctx), got.to_json())
        return
    acc = accuracy_text(got.best_val_accuracy, "n/a")
    _say(_out(ctx), f"run {got.run_id}: best val_accuracy {acc}; {len(got.fetched)} files fetched, "
                    f"{len(got.already_there)} already there, in {got.dest}")


@app.command("runs")
@uses_machine
def runs_cmd(
    ctx: Context,
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, metavar="N", show_default=False,
                                     help="only the N newest runs"),
    json_out: bool = JsonOpt,
) -> None:
    """All runs on the machine (with `storage:`, and in the S3 mirror, saying where each
    lives; only the mirror's when the machine cannot be reached), newest first: state, epochs,
    best val accuracy, parent and how the run compares with it, start, duration. Run ids are
    shown whole."""
    from orchestrator.runs import list_runs, run_json, runs_table

    runs = list_runs(ctx, limit)
    if json_out:
        _print_json(_out(ctx), [run_json(r) for r in runs])
    elif not runs:
        _say(_out(ctx), "no runs yet; start one with `orch deploy`")
    else:
        _print_table(_out(ctx), runs_table(runs))


@app.command()
@uses_machine
def status(ctx: Context, json_out: bool = JsonOpt) -> int:
    """The machine: instance type, state, uptime and cost, GPUs (or CPU load), the active run,
    autostop. Never starts the instance: a stopped one exits 11. A machine that does not answer
    (within ssh.connect_timeout, 15 s at most) is marked unreachable after what EC2 says: exit 4
    (5 for its host key)."""
    from orchestrator.status import machine_status
    from orchestrator.views import status_lines

    st = machine_status(ctx)
    if json_out:
        _print_json(_out(ctx), st.to_json())
    else:
        for line in status_lines(st):
            _say(_out(ctx), line)
    if st.stopped:
        assert st.instance is not None and ctx.output is not None
        _say(ctx.output.err, f"orch: instance {st.instance.id} is {st.instance.state}; `orch up` starts it")
        return int(ExitCode.INSTANCE_STOPPED)
    return st.unreachable_code if st.unreachable else 0


@app.command()
def doctor(typer_ctx: typer.Context, config: str | None = ConfigOpt, json_out: bool = JsonOpt,
           fresh: bool = typer.Option(False, "--fresh", help="import TensorFlow again on the machine even when its "
                                      "cached answer still holds (the cache is dropped by any package change)")) -> int:
    """Every check a first day needs, in order, each ok or failed with the fix: config, AWS,
    instance, SSH and host key, Python, TensorFlow and the GPUs it sees, CUDA driver, data, disk.
    Never starts the instance. Exit 0 only if all pass, else the first failure's code (3 AWS,
    4 connection, 5 host key, 11 instance stopped, 12 not ready, 13 no data)."""
    from dataclasses import asdict

    from orchestrator.doctor import doctor as run_doctor
    from orchestrator.doctor import exit_code

    output = _invocation(typer_ctx).output
    results = run_doctor(_config_path(typer_ctx, config), output, fresh)
    ok = all(r.ok for r in results)
    if json_out:
        _print_json(output.out, {"ok": ok, "checks": [asdict(r) | {"exit_code": int(r.exit_code)} for r in results]})
    else:
        from rich.table import Table

        table = Table("check", "", "detail", "fix", show_lines=False)
        for r in results:
            verdict = "FAILED" if not r.ok else "warning" if r.warning else "ok"
            table.add_row(r.check, verdict, clean(r.detail), clean(r.fix) if not r.ok or r.warning else "")
        _print_table(output.out, table)
    return int(exit_code(results))


@app.command()
@uses_machine
def logs(
    ctx: Context,
    run: str | None = RunArg,
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the run ends"),
) -> None:
    """Print (or follow) a run's train.log (with `storage:`, the mirrored one when the machine
    cannot be reached or lacks the run)."""
    from orchestrator.runs import logs as run_logs

    out = _out(ctx).file

    def write(text: str) -> None:
        out.write(clean(text))
        out.flush()

    run_logs(ctx, run, follow=follow, write=write)


@app.command()
@uses_machine
def stop(
    ctx: Context,
    runs: list[str] | None = typer.Argument(None, help="the runs, ids or unique prefixes (default: the one "
                                            "running)", show_default=False, metavar="[RUN]...",
                                            autocompletion=_complete_run),
    every: bool = typer.Option(False, "--all", help="every run that is running"),
    json_out: bool = JsonOpt,
) -> int:
    """Stop runs: SIGTERM, each trainer saves and marks its run stopped; reports the final states."""
    from orchestrator.runs import run_json
    from orchestrator.runs import stop as run_stop
    from trainer.contract import layout

    if every and runs:
        raise ConfigError("give run ids or --all, not both")
    final = run_stop(ctx, runs or (), every=every)
    if json_out:
        _print_json(_out(ctx), [run_json(r) for r in final] if every or len(runs or ()) > 1 else run_json(final[0]))
    elif not final:
        _say(_out(ctx), "no run is running; nothing to stop")
    for r in final if not json_out else ():
        _say(_out(ctx), f"run {r.run_id} {r.shown_state} at epoch {r.epoch}/{r.epochs}")
    # stopped as asked (or by a spot notice that came at the same time: it stopped and can continue all the same)
    codes = [0 if r.shown_state in (layout.STOPPED, layout.INTERRUPTED) else int(r.exit_code or ExitCode.ERROR)
             for r in final]
    return next((c for c in codes if c), 0)


@app.command("rm")
@uses_machine
def rm(
    ctx: Context,
    runs: list[str] = typer.Argument(..., help="the runs, ids or unique prefixes", show_default=False,
                                     metavar="RUN...", autocompletion=_complete_run),
    with_storage: bool = typer.Option(False, "--storage", help="also remove each run's mirror from storage.s3_uri "
                                      "(else it is kept, and `orch runs` still lists the run there)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation (needed without a terminal)"),
    json_out: bool = JsonOpt,
) -> int:
    """Delete runs from the machine (their folders: checkpoints, metrics, logs) and, with
    --storage, from the S3 mirror. Asks first; refuses an active run (exit 6: stop it first)."""
    from orchestrator.runs import remove
    from orchestrator.status import Consent

    terminal = ctx.output is not None and ctx.output.stdin_isatty
    consent = Consent(yes, (lambda question: typer.confirm(question, default=False)) if terminal else None)
    removal = remove(ctx, runs, with_storage=with_storage, consent=consent)
    if removal is None:
        _say(_out(ctx), "nothing removed")
        return int(ExitCode.INTERRUPTED)
    if json_out:
        _print_json(_out(ctx), removal.to_json())
        return 0
    def objects(n: int) -> str:
        return f"{n} object{'' if n == 1 else 's'}"

    for run_id in removal.removed:
        mirror = removal.mirrors.get(run_id)
        also = f" and its mirror ({objects(mirror)})" if mirror is not None else ""
        _say(_out(ctx), f"removed run {run_id} from {removal.host}{also}")
    for run_id, n in removal.mirrors.items():
        if run_id not in removal.removed:
            _say(_out(ctx), f"removed run {run_id}'s mirror from storage ({objects(n)})")
    return 0


@notify_app.command("test")
@uses_machine
def notify_test(ctx: Context, json_out: bool = JsonOpt) -> None:
    """Send one test message from the machine, through the code its runs notify with, and
    say whether the webhook took it (its HTTP status). Never starts the instance."""
    from dataclasses import asdict

    from orchestrator.notify import test

    sent = test(ctx)
    if json_out:
        _print_json(_out(ctx), asdict(sent))
    else:
        _say(_out(ctx), f"test message delivered to {sent.target}: HTTP {sent.status}"
                        + (f" (after {sent.attempts} tries)" if sent.attempts > 1 else ""))


SpecArg = typer.Argument(..., help="the sweep's SPEC.yaml (name, trials, space, ...: README.md, Sweeps)",
                         show_default=False, metavar="SPEC")


@sweep_app.command("run")
@uses_machine
def sweep_run(
    ctx: Context,
    spec: Path = SpecArg,
    allow_cpu: bool = typer.Option(False, "--allow-cpu", help="trials may train on the CPU of a GPU box whose GPUs "
                                   "TensorFlow cannot see (as deploy's --allow-cpu)"),
    json_out: bool = JsonOpt,
) -> int:
    """Run the sweep: each trial an ordinary orch run with the parameters Optuna asks for, one
    after another, followed to its end (a pruned one is stopped and kept), until the study has
    `trials`, or the budget would be passed. Run again, it continues the study (a trial under
    way is followed, never launched twice). Ctrl-C stops launching; a second Ctrl-C stops the
    running trial too."""
    from orchestrator.sweep import run
    from orchestrator.sweepspec import load_spec

    got = run(ctx, load_spec(spec), launching=LaunchOptions(allow_cpu=allow_cpu))
    _show_sweep(ctx, got, json_out)
    return int(ExitCode.INTERRUPTED) if got.stopped == "Ctrl-C" else 0


@sweep_app.command("status")
@uses_machine
def sweep_status(ctx: Context, spec: Path = SpecArg, json_out: bool = JsonOpt) -> None:
    """The study: every trial (state, parameters, value, run), the best trial's run, and the
    hours the trials took (and their cost, where the machine's price is known). Reads the study's
    storage only."""
    from orchestrator.sweep import status
    from orchestrator.sweepspec import load_spec

    _show_sweep(ctx, status(ctx, load_spec(spec)), json_out)


def _show_sweep(ctx: Context, got: Any, json_out: bool) -> None:
    from orchestrator.views import sweep_lines, sweep_table

    if json_out:
        _print_json(_out(ctx), got.to_json())
        return
    if got.trials:
        _print_table(_out(ctx), sweep_table(got))
    for line in sweep_lines(got):
        _say(_out(ctx), line)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[OPTIONS] [--] COMMAND...")
@uses_machine
def exec_(ctx: Context, trainer_args: list[str] | None = None) -> int:
    """Run a command on the machine, in remote.root, and exit with its exit code:
    `orch exec -- nvidia-smi`, `orch exec 'tail -n 5 runs/*/train.log'`. One argument is a shell
    command line; several are each one word (quoted). Output is streamed (escape sequences
    shown escaped on a terminal; bytes as they are into a pipe); stdin is forwarded when it is
    not a terminal. Never starts a stopped instance."""
    import os

    from orchestrator.shell import execute
    from orchestrator.terminal import OutputClosed, byte_sink

    assert ctx.output is not None
    stdin = None if ctx.output.stdin_isatty else _stdin_reader()
    try:
        return execute(ctx, trainer_args or [], stdin, byte_sink(ctx.output.out.file), byte_sink(ctx.output.err.file))
    except OutputClosed:  # `orch exec -- cat log | head`: the reader has all it wanted
        with contextlib.suppress(OSError, ValueError):  # nothing more may reach the closed pipe at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell says of a command that SIGPIPE ended


def _stdin_reader() -> Callable[[], bytes] | None:
    """This command's stdin, a chunk at a time (None: there is none to read)."""
    import os

    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # closed, or a test's stand-in
        return None
    return functools.partial(os.read, fd, 1 << 16)


@app.command()
@uses_machine
def ssh(ctx: Context) -> int:
    """An interactive shell on the machine, in remote.root: OpenSSH with the resolved settings
    and orch's known_hosts (strict host-key checking), after orch checked the host key as every
    command does; a terminal when stdin is one. On target local: $SHELL in remote.root. Never
    starts a stopped instance."""
    from orchestrator.shell import shell

    assert ctx.output is not None
    return shell(ctx, terminal=ctx.output.stdin_isatty)


@app.command()
@uses_machine
def tensorboard(
    ctx: Context,
    runs: list[str] | None = typer.Argument(None, help="the runs to show (ids or unique prefixes; default: every "
                                            "run)", show_default=False),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, show_default=False,
                                    help="the port here (default: 6006, or a free one when it is taken)"),
    keep: bool = typer.Option(False, "--keep", help="leave TensorBoard running on the machine when this command "
                              "ends (the next `orch tensorboard` for the same runs reuses it)"),
) -> None:
    """TensorBoard for the runs: started on the machine bound to its 127.0.0.1 (or reused: one
    per machine), forwarded to 127.0.0.1:PORT here through the SSH connection; serves until
    Ctrl-C, then stops it unless --keep (or another `orch tensorboard` uses it). Steps are
    epochs from 1; an extended run goes on from its parent's best epoch."""
    from orchestrator.tboard import serve

    ended = serve(ctx, runs or [], port=port, keep=keep, show=lambda board: _say(_out(ctx), board.line()))
    _say(_out(ctx), ended.summary())


def main(argv: list[str] | None = None, output: Output | None = None) -> int:
    """Entry point: run the command; every error -> one line on stderr and its exit code."""
    args = sys.argv[1:] if argv is None else argv
    invocation = Invocation(output or Output.terminal(), debug="--debug" in args)
    err = invocation.output.err
    try:
        result = typer.main.get_command(app)(args=args, prog_name="orch", standalone_mode=False, obj=invocation)
        code = int(result) if isinstance(result, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except SystemExit as exc:  # typer's completion options exit by themselves
        code = exc.code if isinstance(exc.code, int) else 0
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        code = _usage_error(invocation.output, exc)
    except (typer.Abort, KeyboardInterrupt):
        err.print("orch: interrupted")
        code = ExitCode.INTERRUPTED
    except OrchError as exc:
        if invocation.debug:
            raise
        _say(err, f"orch: error: {_one_line(str(exc))}")
        code = exc.exit_code
    except Exception as exc:
        if invocation.debug:
            raise
        _say(err, f"orch: error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
             "(a bug: run with --debug for the traceback and report it)")
        code = ExitCode.ERROR
    if argv is None:
        sys.exit(int(code))
    return int(code)


def _usage_error(output: Output, exc: Any) -> int:
    """A command-line mistake: one line saying what and where to look (bare `orch` and a
    bare group print their help instead)."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        # Making the error rendered the help already: typer's rich help prints as it renders,
        # leaving the message empty; a plain click help is the message itself.
        if exc.format_message().strip():
            output.out.print(exc.format_message())
        return ExitCode.USAGE
    where = ctx.command_path if ctx is not None else "orch"
    hint = _trainer_hint(exc, where) or f"see `{where} --help`"
    _say(output.err, f"orch: error: {_one_line(exc.format_message())} ({hint})")
    return ExitCode.USAGE


def _trainer_hint(exc: Any, where: str) -> str | None:
    """`orch deploy --epochs 3`: a trainer option given as orch's; they go after `--`."""
    name = (getattr(exc, "option_name", None) or "").split("=")[0]
    flags = {o.flag for o in options.OPTIONS} | {"--no-" + o.flag[2:] for o in options.OPTIONS if o.type is bool}
    if type(exc).__name__ != "NoSuchOption" or name not in flags or where.split()[-1] not in ("deploy", "resume"):
        return None
    return f"{name} is a trainer option: give it after `--`, as in `{where} ... -- {name} ...`"


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


if __name__ == "__main__":  # pragma: no cover
    main()
