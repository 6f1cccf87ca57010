"""The `twinserve` command: one typer app; each capability registers its commands here."""

from __future__ import annotations

import typer

from twinserve import __version__
from twinserve.cli import batch, bench, chat, endpoint, generate, jobs, model, plan, rag, registry, serve, up

app = typer.Typer(
    name="twinserve",
    help="twinserve: from a model registry to production LLM inference, on a laptop, a GPU box or the cloud.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"twinserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """twinserve: from a model registry to production LLM inference."""


app.add_typer(model.app, name="model")
app.add_typer(registry.app, name="registry")
app.command("generate")(generate.generate_command)
app.add_typer(bench.app, name="bench")
app.command("serve")(serve.serve_command)
app.command("chat")(chat.chat_command)
app.command("demo")(chat.demo_command)
app.add_typer(endpoint.app, name="endpoint")
app.add_typer(jobs.app, name="jobs")
app.add_typer(batch.app, name="batch")
app.add_typer(rag.app, name="rag")
app.command("up")(up.up_command)
app.command("plan")(plan.plan_command)


if __name__ == "__main__":  # `python -m twinserve.cli.main …` works like the `twinserve` script
    app()
