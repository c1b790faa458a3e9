"""``orch``: parse, call one core function, render."""

from __future__ import annotations

import typer

from orchestrator import __version__

app = typer.Typer(
    name="orch",
    help="Train on a remote EC2 GPU box without hand-written deploy/monitor/download scripts.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print orch's version."""
    typer.echo(f"orch {__version__}")


def main() -> None:
    app()
