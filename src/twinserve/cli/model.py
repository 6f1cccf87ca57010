"""`twinserve model …`: models on this machine."""

from __future__ import annotations

import contextlib
import sys

import typer
from rich.console import Console

from twinserve.errors import TwinserveError

app = typer.Typer(help="Models on this machine.", no_args_is_help=True)
_err = Console(stderr=True)


@app.callback()
def _model() -> None:
    """Models on this machine."""  # a callback keeps `default` a subcommand, not the group itself


@app.command("default")
def default_command(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Print the folder of the default model (SmolLM2-135M-Instruct), building it on first use.

    Only the path goes to stdout, so `--model "$(twinserve model default)"` works.
    """
    from twinserve.registry.default_model import ensure_default_model

    try:
        # Anything a library prints must not end up in the captured path.
        with contextlib.redirect_stdout(sys.stderr):
            path = ensure_default_model(progress=not quiet)
    except TwinserveError as exc:
        _err.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from exc
    typer.echo(str(path))
