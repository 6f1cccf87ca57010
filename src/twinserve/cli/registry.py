"""`twinserve registry …`: import models, name versions with aliases, record metrics.

Thin: parse arguments, call `ModelRegistry`, print. Every error is one readable line on
stderr and exit code 1. MLflow and torch are imported inside the commands, so
`twinserve --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from twinserve.cli import registry_view as view
from twinserve.errors import TwinserveError, ValidationError

if TYPE_CHECKING:
    from twinserve.registry.card import ModelCard
    from twinserve.registry.store import ModelRegistry

app = typer.Typer(
    help="Model registry (MLflow): import models, aliases such as champion, metrics, history.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

_URI_HELP = "MLflow store URI (default: TWINSERVE_REGISTRY_URI, else a SQLite file under TWINSERVE_HOME)."


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Every twinserve error becomes one red line on stderr and exit code 1."""
    try:
        yield
    except TwinserveError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from exc


def _registry(uri: str | None) -> ModelRegistry:
    from twinserve.registry.store import ModelRegistry

    return ModelRegistry(uri)


def _card(path: Path | None) -> ModelCard | None:
    from twinserve.registry.card import load_card

    return load_card(path) if path is not None else None


@app.command("import")
def import_command(
    name: str = typer.Argument(..., help="Registered model name, e.g. llm-twin."),
    source: str = typer.Argument(..., help="A model folder, a .gguf file, or hf://org/name@revision."),
    card: Path | None = typer.Option(None, "--card", help="Model card, YAML or JSON."),
    no_copy: bool = typer.Option(False, "--no-copy", help="Reference the folder in place (not copied)."),
    gguf: bool = typer.Option(False, "--gguf", help="SOURCE is a GGUF file (implied by a .gguf suffix)."),
    force: bool = typer.Option(
        False, "--force", help="Register even if these weights already are a version."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Register a model as the next version of NAME (files hashed, copied, then registered)."""
    with _errors(), view.import_progress(err, enabled=not quiet) as progress:
        registry, model_card = _registry(uri), _card(card)
        if source.startswith("hf://"):
            info = registry.import_hf(
                name, source, model_card, copy=not no_copy, force=force, progress=progress
            )
        elif gguf or source.lower().endswith(".gguf"):
            if no_copy:
                raise ValidationError("--no-copy does not apply to a GGUF: the converted folder is stored")
            info = registry.import_gguf(name, Path(source), model_card, force=force, progress=progress)
        else:
            info = registry.import_model(
                name, Path(source), model_card, copy=not no_copy, force=force, progress=progress
            )
    out.print(f"Registered [bold]{info.uri}[/bold] (sha256 {info.content_sha256[:12]}, {info.storage.value})")


@app.command("import-default")
def import_default_command(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Register SmolLM2-135M-Instruct as llm-twin (alias champion) unless llm-twin exists."""
    with _errors(), view.import_progress(err, enabled=not quiet) as progress:
        info = _registry(uri).import_default(progress=progress)
    aliases = f" @{', @'.join(info.aliases)}" if info.aliases else ""
    out.print(f"{info.uri}{aliases} (sha256 {info.content_sha256[:12]})")


@app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Registered models with their latest version and aliases."""
    with _errors():
        models = _registry(uri).list_models()
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
    elif not models:
        out.print("No registered models. Import one: twinserve registry import NAME FOLDER")
    else:
        out.print(view.models_table(models))


@app.command("show")
def show_command(
    model: str = typer.Argument(..., help="NAME (all versions), NAME/VERSION or NAME@ALIAS (one version)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Versions of a model (aliases, metrics, card, created, hash), or one version in full."""
    from twinserve.registry.refs import AliasRef, parse_model_spec

    with _errors():
        name, ref = parse_model_spec(model)
        registry = _registry(uri)
        if ref is None:
            versions = registry.list_versions(name)
        elif isinstance(ref, AliasRef):
            versions = [registry.get_version(name, alias=ref.alias)]
        else:
            versions = [registry.get_version(name, ref.version)]
    if as_json:
        payload = [v.model_dump(mode="json") for v in versions]
        typer.echo(json.dumps(payload if ref is None else payload[0], indent=2))
    elif ref is None:
        out.print(view.versions_table(name, versions))
    else:
        out.print(view.version_details(versions[0]))


@app.command("history")
def history_command(
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str | None = typer.Option(None, "--alias", help="Only this alias."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Who moved which alias, when, from which version to which, and why."""
    with _errors():
        moves = _registry(uri).alias_history(name, alias)
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in moves], indent=2))
    elif not moves:
        out.print(f"No alias moves recorded for {name}.")
    else:
        out.print(view.history_table(name, moves))


@app.command("set-alias")
def set_alias_command(
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Argument(..., help="Alias, e.g. champion."),
    version: int = typer.Argument(..., min=1, help="Version the alias points at."),
    reason: str | None = typer.Option(None, "--reason", help="Recorded in the alias history."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Point ALIAS at VERSION (recorded in the history)."""
    with _errors():
        move = _registry(uri).set_alias(name, alias, version, reason=reason)
    if move.from_version == move.to_version:
        out.print(f"{name}@{alias} already points at version {version}")
    else:
        before = f"version {move.from_version}" if move.from_version is not None else "nothing"
        out.print(f"{name}@{alias}: {before} → version {version}")


@app.command("log-metrics")
def log_metrics_command(
    name: str = typer.Argument(..., help="Registered model name."),
    version: int = typer.Argument(..., min=1, help="Version the metrics belong to."),
    metric: list[str] = typer.Option([], "--metric", "-m", help="NAME=VALUE, repeatable."),
    from_json: Path | None = typer.Option(
        None,
        "--from-json",
        help="JSON file of {metric: number} (or {'metrics': {...}}); other keys are skipped.",
    ),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Record evaluation metrics of a version (shown by `show`, used by promotion gates)."""
    with _errors():
        values = _read_metrics(metric, from_json)
        now = _registry(uri).log_metrics(name, version, values)
    out.print(f"models:/{name}/{version}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(now.items())))


def _read_metrics(pairs: list[str], path: Path | None) -> dict[str, float]:
    values: dict[str, float] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValidationError(f"cannot read metrics from {path}: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            data = data["metrics"]
        if not isinstance(data, dict):
            raise ValidationError(f"{path} must hold a JSON object of metric: number")
        numbers = {
            k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if not numbers:
            raise ValidationError(f"{path} holds no numeric metrics")
        values.update(numbers)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        try:
            values[key.strip()] = float(raw)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ValidationError(f"bad --metric {pair!r}: expected NAME=NUMBER, e.g. rougeL=0.41")
    if not values:
        raise ValidationError("no metrics: pass --metric NAME=VALUE or --from-json FILE")
    return values


@app.command("promote")
def promote_command(
    name: str = typer.Argument(..., help="Registered model name, e.g. llm-twin."),
    version: int = typer.Argument(..., help="Candidate version."),
    alias: str = typer.Option("champion", "--alias", help="Alias to move."),
    require: list[str] = typer.Option(
        [], "--require", help='Metric requirement, repeatable: "rougeL>=0.35", "toxicity<=0.1".'
    ),
    compare_to: str | None = typer.Option(
        None,
        "--compare-to",
        help="Also require not being worse than this alias's holder on the named metrics.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Evaluate the gate without moving the alias."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Move ALIAS to NAME/VERSION only if every requirement holds; exit 1 with the reason otherwise."""
    from twinserve.registry.promotion import promote

    with _errors():
        result = promote(
            _registry(uri), name, version, alias, require, compare_to=compare_to, dry_run=dry_run
        )
    table = Table(title=f"gate for {name}/{version} → @{alias}")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for check in result.gate.checks:
        table.add_row(check.check, "[green]pass[/green]" if check.passed else "[red]FAIL[/red]", check.detail)
    out.print(table)
    if not result.gate.passed:
        err.print(
            f"[red]not promoted:[/red] {name}@{alias} unchanged\n{result.gate.reason()}", highlight=False
        )
        raise typer.Exit(1)
    if result.move is None:
        out.print(f"dry run: the gate passes; {name}@{alias} unchanged")
        return
    before = f"v{result.move.from_version}" if result.move.from_version else "nothing"
    out.print(f"[green]promoted[/green] {name}@{alias}: {before} → v{version}")


@app.command("rollback")
def rollback_command(
    name: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Option("champion", "--alias", help="Alias to move back."),
    uri: str | None = typer.Option(None, "--uri", help=_URI_HELP),
) -> None:
    """Move ALIAS back to the version it held before its last promotion."""
    from twinserve.registry.promotion import rollback

    with _errors():
        move = rollback(_registry(uri), name, alias)
    out.print(f"[yellow]rolled back[/yellow] {name}@{alias}: v{move.from_version} → v{move.to_version}")
