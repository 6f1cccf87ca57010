"""`twinserve endpoint …`: real-time endpoints on this machine (create, describe, list, invoke, update,
scale, reconcile, export-scaling, delete, logs).

Thin: parses, calls `endpoints.control.EndpointManager`, prints with rich. Heavy modules are
imported inside the commands so `twinserve --help` stays fast. Exit codes: 0 ok, 1 an
operation failed (not found, start-up failed, request error), 2 a bad config or flags.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from twinserve.endpoints.control import EndpointManager
    from twinserve.endpoints.spec import Endpoint, EndpointConfig

app = typer.Typer(help="Real-time endpoints: replicas behind one router URL.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _manager() -> EndpointManager:
    from twinserve.endpoints.control import EndpointManager

    return EndpointManager()


def _build_config(
    name: str, model: str | None, config: Path | None, variant: dict[str, Any], endpoint: dict[str, Any]
) -> EndpointConfig:
    """The EndpointConfig from `--config FILE.yaml` or from `--model` and the per-variant flags."""
    import yaml
    from pydantic import ValidationError

    from twinserve.endpoints.spec import EndpointConfig

    try:
        if config is not None:
            if model is not None:
                _fail("give either --model or --config, not both", 2)
            data = yaml.safe_load(config.read_text())
            if not isinstance(data, dict):
                _fail(f"{config}: an endpoint config is a YAML mapping (name:, variants:, ...)", 2)
            if data.setdefault("name", name) != name:
                _fail(f"{config} names the endpoint {data['name']!r}, not {name!r}", 2)
            return EndpointConfig.from_dict({**data, **endpoint})
        if model is None:
            _fail("give --model REF (or --config FILE.yaml)", 2)
        given = {k: v for k, v in variant.items() if v is not None}
        return EndpointConfig.model_validate(
            {"name": name, "variants": [{"model": model, **given}], **endpoint}
        )
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as exc:
        _fail(f"invalid endpoint config: {exc}", 2)


def _target_tracking(bounds: str, target: float) -> dict[str, Any]:
    """`--autoscale 1..2` as a target tracking policy on concurrent requests per replica."""
    low, sep, high = bounds.partition("..")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        _fail(f"--autoscale takes MIN..MAX, e.g. 1..2 (got {bounds!r})", 2)
    return {
        "type": "target_tracking",
        "metric": "concurrent_requests_per_replica",
        "target": target,
        "min_replicas": int(low),
        "max_replicas": int(high),
    }


@app.command("create")
def create_command(
    name: str = typer.Argument(..., help="Endpoint name (a DNS label)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="models:/name@alias, models:/name/N or a folder."
    ),
    replicas: int | None = typer.Option(None, "--replicas", min=1, help="Replicas to start (default 1)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads per replica."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto | bfloat16 | float16 | float32"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    config: Path | None = typer.Option(None, "--config", "-c", help="EndpointConfig YAML file."),
    api_key: str | None = typer.Option(None, "--api-key", help="Bearer key the router and replicas require."),
    autoscale: str | None = typer.Option(
        None, "--autoscale", help="MIN..MAX replicas, target tracking on concurrent requests per replica."
    ),
    target_concurrency: float = typer.Option(
        4.0,
        "--target-concurrency",
        min=0.1,
        help="With --autoscale: concurrent requests per replica to keep.",
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until InService (or Failed)."),
) -> None:
    """Start replicas, a router and a controller; print the endpoint URL."""
    from twinserve.errors import TwinserveError

    endpoint: dict[str, Any] = {"api_key": api_key} if api_key else {}
    if autoscale is not None:
        endpoint["autoscaling"] = _target_tracking(autoscale, target_concurrency)
        replicas = replicas or endpoint["autoscaling"]["min_replicas"]
    variant = {"replicas": replicas, "threads": threads, "dtype": dtype, "device": device}
    cfg = _build_config(name, model, config, variant, endpoint)
    manager = _manager()
    try:
        with err.status(f"creating endpoint {name!r}") as status:

            def progress(message: str) -> None:
                err.print(f"[dim]{message}[/dim]", highlight=False)
                status.update(message)

            ep = manager.create(cfg, wait=wait, progress=progress)
    except TwinserveError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        _fail(f"interrupted; endpoint {name!r} was stopped and marked Failed", 130)
    if ep.url:
        out.print(f"endpoint [bold]{name}[/bold] is {ep.status}: {ep.url}", highlight=False, soft_wrap=True)
    else:
        out.print(
            f"endpoint [bold]{name}[/bold] is {ep.status}; follow with `twinserve endpoint describe {name}`"
        )


def _describe(manager: EndpointManager, name: str) -> Endpoint:
    from twinserve.errors import NotFoundError

    try:
        return manager.describe(name)
    except NotFoundError as exc:
        _fail(exc.message)


@app.command("describe")
def describe_command(name: str = typer.Argument(..., help="Endpoint name.")) -> None:
    """Status, URL, variants and replicas (probed now), and the last failure reason."""
    from rich.table import Table

    manager = _manager()
    ep = _describe(manager, name)
    out.print(f"[bold]{ep.name}[/bold]  status: {ep.status}  url: {ep.url or '-'}", highlight=False)
    out.print(f"created {ep.created_at:%Y-%m-%d %H:%M:%S} UTC, updated {ep.updated_at:%Y-%m-%d %H:%M:%S} UTC")
    router = "up" if manager.router_alive(ep) else "[red]down[/red]"
    controller = "up" if manager.controller_alive(ep) else "[yellow]not running[/yellow]"
    out.print(f"generation {ep.generation}  router: {router}  controller: {controller}", highlight=False)
    if ep.operation:
        out.print(f"operation in progress: {ep.operation} (pid {ep.operation_pid})")
    if ep.target is not None:
        models = ", ".join(f"{v.name}={v.model}" for v in ep.target.variants)
        out.print(f"rolling out generation {ep.generation + 1} ({models}): {ep.target_share:.0%} of traffic")
    variants = Table("variant", "model", "weight", "desired", "current", title="variants")
    for v in ep.variants:
        cfg = ep.config.variant(v.name)
        variants.add_row(
            v.name, cfg.model, f"{cfg.weight:g}", str(v.desired_replicas), str(v.current_replicas)
        )
    out.print(variants)
    replicas = Table("replica", "variant", "gen", "state", "pid", "port", "model version", title="replicas")
    for r in ep.replicas:
        replicas.add_row(
            r.id,
            r.variant,
            str(r.generation),
            str(r.state),
            str(r.pid or "-"),
            str(r.port),
            r.model_version or "-",
        )
    out.print(replicas)
    if ep.config.autoscaling is not None:
        p = ep.config.autoscaling
        bound = f"{p.min_replicas}..{p.max_replicas}"
        rule = f"target {p.target:g}" if p.type == "target_tracking" else f"threshold {p.threshold:g}"
        out.print(f"autoscaling: {p.type} on {p.metric}, {rule}, replicas {bound}", highlight=False)
    events = manager.events(name, limit=10)
    if events:
        table = Table("time (UTC)", "variant", "from → to", "metric", "reason", title="scaling events")
        for e in events:
            metric = f"{e.metric_value:.2f}" if e.metric_value is not None else "-"
            table.add_row(
                f"{e.time:%H:%M:%S}", e.variant, f"{e.from_replicas} → {e.to_replicas}", metric, e.reason
            )
        out.print(table)
    if ep.failure_reason:
        out.print(f"[red]failure reason:[/red]\n{ep.failure_reason}", highlight=False, soft_wrap=True)


@app.command("list")
def list_command() -> None:
    """Every endpoint with its status, URL and healthy/desired replicas."""
    from rich.table import Table

    endpoints = _manager().list_endpoints()
    if not endpoints:
        out.print("no endpoints")
        return
    table = Table("name", "status", "url", "replicas (healthy/desired)", "created (UTC)")
    for ep in endpoints:
        healthy = sum(v.current_replicas for v in ep.variants)
        desired = sum(v.desired_replicas for v in ep.variants)
        table.add_row(
            ep.name, str(ep.status), ep.url or "-", f"{healthy}/{desired}", f"{ep.created_at:%Y-%m-%d %H:%M}"
        )
    out.print(table)


@app.command("invoke")
def invoke_command(
    name: str = typer.Argument(..., help="Endpoint name."),
    prompt: str = typer.Argument(..., help="The user message (sent to the chat route)."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they come."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float | None = typer.Option(None, "--temperature", help="Sample at this temperature."),
) -> None:
    """Ask the endpoint through its router (OpenAI chat route); its API key is used if it has one."""
    from twinserve.client import LLMClient
    from twinserve.errors import TwinserveError

    ep = _describe(_manager(), name)
    if not ep.status.accepts_traffic or ep.url is None:
        _fail(f"endpoint {name!r} is {ep.status}, not serving")
    key = ep.config.api_key.get_secret_value() if ep.config.api_key else None
    messages = [{"role": "user", "content": prompt}]
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    try:
        with LLMClient(ep.url, api="openai", api_key=key) as client:
            if stream:
                for chunk in client.chat_stream(messages, **params):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                typer.echo(client.chat(messages, **params).text)
    except TwinserveError as exc:
        _fail(exc.message)


def _run_operation(label: str, operation: Any) -> Endpoint:
    """Run an EndpointManager operation with progress on stderr; errors become exit codes."""
    from twinserve.errors import ClientError, TwinserveError

    with err.status(label) as status:

        def progress(message: str) -> None:
            err.print(f"[dim]{message}[/dim]", highlight=False)
            status.update(message)

        try:
            result: Endpoint = operation(progress)
            return result
        except ClientError as exc:  # not found, busy, outside the bounds
            _fail(exc.message, 2 if exc.status_code == 422 else 1)
        except TwinserveError as exc:
            _fail(exc.message)
        except KeyError as exc:
            _fail(str(exc.args[0]) if exc.args else str(exc), 2)


@app.command("update")
def update_command(
    name: str = typer.Argument(..., help="Endpoint name."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="New model for the variant (models:/llm-twin/4, an alias, a folder)."
    ),
    variant: str | None = typer.Option(None, "--variant", help="Variant to change (default: the first)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="A whole new EndpointConfig YAML."),
    canary: list[float] = typer.Option(
        [],
        "--canary",
        help="Traffic percent to the new version before 100 (repeat: --canary 10 --canary 50).",
    ),
    bake: float = typer.Option(
        30.0, "--bake", min=0, help="Seconds each canary step is held; errors or deaths roll back."
    ),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until InService (or rolled back)."),
) -> None:
    """Blue/green: start the new version beside the old, shift traffic (in canary steps), drain the
    old; if the new version does not come up healthy, roll back and keep serving the old one."""
    manager = _manager()
    if (model is None) == (config is None):
        _fail("give --model REF or --config FILE.yaml", 2)
    if config is not None:
        target = _build_config(name, None, config, {}, {})
        current = _describe(manager, name).config
        if target.api_key is None and current.api_key is not None:  # keep the key unless a new one is given
            target = target.model_copy(update={"api_key": current.api_key})
    else:
        assert model is not None
        _describe(manager, name)
        try:
            target = manager.config_with_model(name, model, variant=variant)
        except KeyError as exc:
            _fail(str(exc.args[0]), 2)
    if not wait:
        from twinserve.errors import TwinserveError

        try:
            manager.update_detached(name, target, canary_percent=canary, bake_s=bake)
        except TwinserveError as exc:
            _fail(exc.message)
        out.print(
            f"endpoint [bold]{name}[/bold] is Updating; follow with `twinserve endpoint describe {name}`"
        )
        return
    ep = _run_operation(
        f"updating endpoint {name!r}",
        lambda progress: manager.update(name, target, canary_percent=canary, bake_s=bake, progress=progress),
    )
    versions = sorted({r.model_version or "?" for r in ep.replicas})
    out.print(
        f"endpoint [bold]{name}[/bold] is {ep.status} on generation {ep.generation} ({', '.join(versions)})",
        highlight=False,
    )


@app.command("scale")
def scale_command(
    name: str = typer.Argument(..., help="Endpoint name."),
    replicas: int = typer.Option(..., "--replicas", "-n", min=1, help="Replicas the variant should run."),
    variant: str | None = typer.Option(None, "--variant", help="Variant to scale (default: the first)."),
) -> None:
    """Set a variant's replica count (within the autoscaling bounds, if it has a policy)."""
    manager = _manager()
    ep = _run_operation(
        f"scaling endpoint {name!r}",
        lambda progress: manager.scale(name, replicas, variant=variant, progress=progress),
    )
    counts = ", ".join(f"{v.name}: {v.current_replicas}/{v.desired_replicas}" for v in ep.variants)
    out.print(f"endpoint [bold]{name}[/bold] is {ep.status} ({counts} healthy/desired)", highlight=False)


@app.command("reconcile")
def reconcile_command(
    name: str | None = typer.Argument(None, help="Endpoint name (default: every endpoint)."),
) -> None:
    """Repair after a crash: recover interrupted operations, replace dead replicas, restart the
    router (same URL) and the controller."""
    from twinserve.errors import NotFoundError

    manager = _manager()
    names = [name] if name else [e.name for e in manager.store.list_endpoints()]
    for each in names:
        try:
            actions = manager.reconcile(
                each, ensure_controller=True, progress=lambda m: err.print(f"[dim]{m}[/dim]")
            )
        except NotFoundError as exc:
            _fail(exc.message)
        out.print(f"{each}: {'; '.join(actions) if actions else 'nothing to do'}", highlight=False)


@app.command("export-scaling")
def export_scaling_command(
    name: str | None = typer.Argument(None, help="Endpoint whose policy to export."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Or an EndpointConfig YAML file."),
    sagemaker_name: str | None = typer.Option(
        None, "--sagemaker-endpoint", help="SageMaker endpoint name in the ResourceIds (default: the name)."
    ),
) -> None:
    """Print the autoscaling policy as SageMaker Application Auto Scaling calls (boto3 kwargs, JSON)."""
    import json

    from twinserve.endpoints.sagemaker_scaling import sagemaker_scaling_calls
    from twinserve.endpoints.spec import EndpointConfig

    if (name is None) == (config is None):
        _fail("give an endpoint NAME or --config FILE.yaml", 2)
    if config is not None:
        try:
            cfg = EndpointConfig.from_yaml(config)
        except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
            _fail(f"invalid endpoint config: {exc}", 2)
    else:
        cfg = _describe(_manager(), name or "").config
    if cfg.autoscaling is None:
        _fail(f"endpoint {cfg.name!r} has no autoscaling policy", 2)
    try:
        calls = sagemaker_scaling_calls(cfg, endpoint_name=sagemaker_name)
    except ValueError as exc:
        _fail(str(exc), 2)
    typer.echo(json.dumps([c.model_dump() for c in calls], indent=2))


@app.command("delete")
def delete_command(name: str = typer.Argument(..., help="Endpoint name.")) -> None:
    """Drain and stop the router and the replicas, then forget the endpoint (a missing one is fine)."""
    with err.status(f"deleting endpoint {name!r}"):
        deleted = _manager().delete(name)
    out.print(f"endpoint {name!r} deleted" if deleted else f"endpoint {name!r} does not exist; nothing to do")


@app.command("logs")
def logs_command(
    name: str = typer.Argument(..., help="Endpoint name."),
    lines: int = typer.Option(50, "--lines", "-n", min=1, help="Last lines of each log."),
) -> None:
    """The last lines of each replica's log and of the router's."""
    from twinserve.errors import NotFoundError

    try:
        logs = _manager().logs(name, lines)
    except NotFoundError as exc:
        _fail(exc.message)
    for source, text in logs.items():
        out.print(f"[bold]==> {source} <==[/bold]", highlight=False)
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        sys.stdout.flush()
