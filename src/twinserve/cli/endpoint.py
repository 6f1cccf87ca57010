"""`twinserve endpoint …`: endpoints on a platform (create, describe, list, invoke, invoke-async,
update, scale, autoscale, reconcile, export-scaling, delete, logs).

Thin: parses, calls the endpoint's `Platform` (`--platform` at create, recorded per endpoint,
so later commands find it), prints with rich. Heavy modules are
imported inside the commands so `twinserve --help` stays fast. Exit codes: 0 ok, 1 an
operation failed (not found, start-up failed, request error), 2 a bad config or flags.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from twinserve.cli.output import err, fail, out

if TYPE_CHECKING:
    from twinserve.deploy.platform import Platform
    from twinserve.deploy.spec import Endpoint, EndpointConfig
    from twinserve.platforms.local.platform import LocalPlatform

app = typer.Typer(
    help="Endpoints, real-time or async: on this machine (replicas behind one router URL) or on SageMaker.",
    no_args_is_help=True,
)


def _manager() -> LocalPlatform:
    from twinserve.platforms.local.platform import LocalPlatform

    return LocalPlatform()


def _platform(name: str) -> Platform:
    """The platform endpoint `name` was created on (exit 1 when there is no such endpoint)."""
    from twinserve.errors import NotFoundError
    from twinserve.platforms import platform_of

    try:
        return platform_of(name)
    except NotFoundError as exc:
        fail(exc.message)


def _local(name: str) -> LocalPlatform:
    """The local platform, for commands only it has (exit 2 for an endpoint elsewhere)."""
    from twinserve.platforms.local.platform import LocalPlatform

    platform = _platform(name)
    if not isinstance(platform, LocalPlatform):
        fail(f"endpoint {name!r} runs on {platform.name}; this command is for local endpoints", 2)
    return platform


def _build_config(
    name: str, model: str | None, config: Path | None, variant: dict[str, Any], endpoint: dict[str, Any]
) -> EndpointConfig:
    """The EndpointConfig from `--config FILE.yaml` or from `--model` and the per-variant flags."""
    import yaml
    from pydantic import ValidationError

    from twinserve.deploy.spec import EndpointConfig

    try:
        if config is not None:
            if model is not None:
                fail("give either --model or --config, not both", 2)
            data = yaml.safe_load(config.read_text())
            if not isinstance(data, dict):
                fail(f"{config}: an endpoint config is a YAML mapping (name:, variants:, ...)", 2)
            if data.setdefault("name", name) != name:
                fail(f"{config} names the endpoint {data['name']!r}, not {name!r}", 2)
            return EndpointConfig.from_dict({**data, **endpoint})
        if model is None:
            fail("give --model REF (or --config FILE.yaml)", 2)
        given = {k: v for k, v in variant.items() if v is not None}
        return EndpointConfig.model_validate(
            {"name": name, "variants": [{"model": model, **given}], **endpoint}
        )
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as exc:
        fail(f"invalid endpoint config: {exc}", 2)


def _target_tracking(
    bounds: str, target: float, metric: str = "concurrent_requests_per_replica"
) -> dict[str, Any]:
    """`--autoscale 1..2` as a target tracking policy (on concurrent requests per replica, or
    on the backlog per replica for an async endpoint)."""
    low, sep, high = bounds.partition("..")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        fail(f"--autoscale takes MIN..MAX, e.g. 1..2 (got {bounds!r})", 2)
    return {
        "type": "target_tracking",
        "metric": metric,
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
    platform: str | None = typer.Option(
        None, "--platform", help="local (default) | sagemaker | ray; recorded, later commands need no flag."
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="ray: auto (default: this machine's cluster), HOST:PORT or ray://HOST:10001.",
    ),
    region: str | None = typer.Option(None, "--region", help="sagemaker: AWS region."),
    role_arn: str | None = typer.Option(None, "--role-arn", help="sagemaker: execution role ARN."),
    instance_type: str | None = typer.Option(
        None, "--instance-type", help="sagemaker: e.g. ml.g5.2xlarge (default: the planner's pick)."
    ),
    image: str | None = typer.Option(
        None, "--image", help="sagemaker: container image (default: HF LLM DLC)."
    ),
    hf_token_secret: str | None = typer.Option(
        None, "--hf-token-secret", help="sagemaker: Secrets Manager ARN of a Hub token (gated models)."
    ),
    keep_on_failure: bool = typer.Option(
        False, "--keep-on-failure", help="sagemaker: keep what was created when the endpoint fails."
    ),
    is_async: bool = typer.Option(
        False, "--async", help="Asynchronous inference: POST /async-invocations, a durable queue, scale to 0."
    ),
    max_concurrent_invocations: int | None = typer.Option(
        None, "--max-concurrent-invocations", min=1, help="--async: jobs per replica at once (default 8)."
    ),
    target_backlog: float | None = typer.Option(
        None, "--target-backlog", min=0.1, help="--async --autoscale: jobs per replica to keep (default: K)."
    ),
    output_location: str | None = typer.Option(
        None, "--output-location", help="--async: results folder or s3://bucket/prefix."
    ),
    failure_location: str | None = typer.Option(
        None, "--failure-location", help="--async: error bodies (default: failures/ under the results)."
    ),
    notify_success: str | None = typer.Option(None, "--notify-success", help="--async: webhook on success."),
    notify_error: str | None = typer.Option(None, "--notify-error", help="--async: webhook on failure."),
    success_topic: str | None = typer.Option(
        None, "--success-topic", help="--async on sagemaker: SNS topic ARN for successes."
    ),
    error_topic: str | None = typer.Option(
        None, "--error-topic", help="--async on sagemaker: SNS topic ARN for failures."
    ),
) -> None:
    """Deploy an endpoint (locally: replicas, a router and a controller); print its URL."""
    from twinserve.cli.endpoint_async import async_block
    from twinserve.errors import TwinserveError
    from twinserve.platforms import get_platform

    endpoint: dict[str, Any] = {"api_key": api_key} if api_key else {}
    asynchronous = async_block(
        is_async,
        max_concurrent_invocations=max_concurrent_invocations,
        output_location=output_location,
        failure_location=failure_location,
        notify_success_url=notify_success,
        notify_error_url=notify_error,
        success_topic_arn=success_topic,
        error_topic_arn=error_topic,
    )
    if asynchronous is not None:
        endpoint["async"] = asynchronous
    elif target_backlog is not None:
        fail("--target-backlog is an --async flag", 2)
    sagemaker = {
        k: v
        for k, v in {
            "region": region,
            "role_arn": role_arn,
            "instance_type": instance_type,
            "image": image,
            "hf_token_secret": hf_token_secret,
        }.items()
        if v is not None
    }
    if platform not in (None, "local", "sagemaker", "ray"):
        fail(f"--platform is local, sagemaker or ray, not {platform!r}", 2)
    if ray_address is not None and platform != "ray":
        fail("--ray-address is a ray flag; add --platform ray", 2)
    if (sagemaker or keep_on_failure) and platform != "sagemaker":
        flag = next(iter(sagemaker), "keep_on_failure").replace("_", "-")
        fail(f"--{flag} is a sagemaker flag; add --platform sagemaker", 2)
    if platform == "sagemaker":
        endpoint["platform"] = {"type": "sagemaker", "sagemaker": sagemaker}
    if platform == "ray":
        endpoint["platform"] = {"type": "ray", "ray": {"address": ray_address} if ray_address else {}}
    if autoscale is not None:
        if asynchronous is not None:
            target = target_backlog or asynchronous.get("max_concurrent_invocations_per_replica", 8)
            endpoint["autoscaling"] = _target_tracking(autoscale, target, "backlog_per_replica")
        else:
            endpoint["autoscaling"] = _target_tracking(autoscale, target_concurrency)
        replicas = replicas or max(endpoint["autoscaling"]["min_replicas"], 1)
    variant = {"replicas": replicas, "threads": threads, "dtype": dtype, "device": device}
    cfg = _build_config(name, model, config, variant, endpoint)
    target = get_platform(cfg.platform.type)
    extra: dict[str, Any] = {"keep_on_failure": True} if keep_on_failure else {}
    try:
        with err.status(f"creating endpoint {name!r} on {target.name}") as status:

            def progress(message: str) -> None:
                err.print(f"[dim]{message}[/dim]", highlight=False)
                status.update(message)

            ep = target.create(cfg, wait=wait, progress=progress, **extra)
    except TwinserveError as exc:
        fail(exc.message)
    except KeyboardInterrupt:
        fail(f"interrupted; endpoint {name!r} was stopped and marked Failed", 130)
    except ValueError as exc:  # a config the platform refuses before deploying (pydantic included)
        fail(f"invalid endpoint config: {exc}", 2)
    if ep.url:
        out.print(f"endpoint [bold]{name}[/bold] is {ep.status}: {ep.url}", highlight=False, soft_wrap=True)
    else:
        out.print(
            f"endpoint [bold]{name}[/bold] is {ep.status}; follow with `twinserve endpoint describe {name}`"
        )


def _describe(platform: Platform, name: str) -> Endpoint:
    from twinserve.errors import NotFoundError, TwinserveError

    try:
        return platform.describe(name)
    except NotFoundError as exc:
        fail(exc.message)
    except TwinserveError as exc:  # e.g. the cloud did not answer
        fail(exc.message)


@app.command("describe")
def describe_command(name: str = typer.Argument(..., help="Endpoint name.")) -> None:
    """Status, URL, variants (reference → pinned version), replicas, policy, events, failure reason."""
    from twinserve.cli.endpoint_view import render_endpoint
    from twinserve.deploy.state import StateStore

    platform = _platform(name)
    ep = _describe(platform, name)
    render_endpoint(out, ep, platform, StateStore().events(name, limit=10))


@app.command("list")
def list_command() -> None:
    """Every endpoint with its platform, status, URL and healthy/desired replicas."""
    from rich.table import Table

    from twinserve.deploy.state import StateStore
    from twinserve.errors import NotFoundError, TwinserveError
    from twinserve.platforms import get_platform

    store = StateStore()
    stored = store.list_endpoints()
    if not stored:
        out.print("no endpoints")
        return
    table = Table("name", "platform", "status", "url", "replicas (healthy/desired)", "created (UTC)")
    for each in stored:
        try:
            ep = get_platform(each.config.platform.type, store).describe(each.name)
        except NotFoundError:  # deleted while we looked
            continue
        except TwinserveError:  # the platform did not answer: show what was recorded
            ep = each
        healthy = sum(v.current_replicas for v in ep.variants)
        desired = sum(v.desired_replicas for v in ep.variants)
        table.add_row(
            ep.name,
            ep.config.platform.type,
            str(ep.status),
            ep.url or "-",
            f"{healthy}/{desired}",
            f"{ep.created_at:%Y-%m-%d %H:%M}",
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
    """Ask the endpoint (OpenAI chat route) through its platform's transport, with its API key."""
    from twinserve.client import LLMClient
    from twinserve.errors import TwinserveError

    platform = _platform(name)
    ep = _describe(platform, name)
    if not ep.status.accepts_traffic or ep.url is None:
        fail(f"endpoint {name!r} is {ep.status}, not serving")
    messages = [{"role": "user", "content": prompt}]
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature is not None:
        params["temperature"] = temperature
    try:
        with LLMClient(transport=platform.transport(ep), api="openai") as client:
            if stream:
                for chunk in client.chat_stream(messages, **params):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                typer.echo(client.chat(messages, **params).text)
    except TwinserveError as exc:
        fail(exc.message)


def _register_async_commands() -> None:
    from twinserve.cli.endpoint_async import invoke_async_command

    app.command("invoke-async")(invoke_async_command)


_register_async_commands()


def _run_operation(label: str, operation: Any) -> Endpoint:
    """Run a platform operation with progress on stderr; errors become exit codes."""
    from twinserve.errors import ClientError, TwinserveError

    with err.status(label) as status:

        def progress(message: str) -> None:
            err.print(f"[dim]{message}[/dim]", highlight=False)
            status.update(message)

        try:
            result: Endpoint = operation(progress)
            return result
        except ClientError as exc:  # not found, busy, outside the bounds
            fail(exc.message, 2 if exc.status_code == 422 else 1)
        except TwinserveError as exc:
            fail(exc.message)
        except KeyError as exc:
            fail(str(exc.args[0]) if exc.args else str(exc), 2)
        except ValueError as exc:  # a config the platform refuses (pydantic's errors included)
            fail(f"invalid endpoint config: {exc}", 2)


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
    from twinserve.deploy.platform_config import PlatformConfig

    if (model is None) == (config is None):
        fail("give --model REF or --config FILE.yaml", 2)
    platform = _platform(name)
    current = _describe(platform, name)
    if config is not None:
        target = _build_config(name, None, config, {}, {})
        if (
            target.api_key is None and current.config.api_key is not None
        ):  # keep the key unless a new one is given
            target = target.model_copy(update={"api_key": current.config.api_key})
        if target.platform == PlatformConfig():  # no platform: block → stay where it runs
            target = target.model_copy(update={"platform": current.config.platform})
    else:
        assert model is not None
        try:
            target = current.config_with_model(model, variant=variant)
        except KeyError as exc:
            fail(str(exc.args[0]), 2)
    if not wait:
        from twinserve.errors import TwinserveError

        try:
            _local(name).update_detached(name, target, canary_percent=canary, bake_s=bake)
        except TwinserveError as exc:
            fail(exc.message)
        out.print(
            f"endpoint [bold]{name}[/bold] is Updating; follow with `twinserve endpoint describe {name}`"
        )
        return
    ep = _run_operation(
        f"updating endpoint {name!r}",
        lambda progress: platform.update(name, target, canary_percent=canary, bake_s=bake, progress=progress),
    )
    versions = sorted(
        {r.model_version or "?" for r in ep.replicas}
        or {v.pinned.label for v in ep.config.variants if v.pinned is not None}
    )
    out.print(
        f"endpoint [bold]{name}[/bold] is {ep.status} on generation {ep.generation} ({', '.join(versions)})",
        highlight=False,
    )


@app.command("scale")
def scale_command(
    name: str = typer.Argument(..., help="Endpoint name."),
    replicas: int = typer.Option(
        ..., "--replicas", "-n", min=0, help="Replicas the variant should run (0: async endpoints only)."
    ),
    variant: str | None = typer.Option(None, "--variant", help="Variant to scale (default: the first)."),
) -> None:
    """Set a variant's replica (instance) count, within the autoscaling bounds if it has a policy."""
    platform = _platform(name)
    ep = _run_operation(
        f"scaling endpoint {name!r}",
        lambda progress: platform.scale(name, replicas, variant=variant, progress=progress),
    )
    counts = ", ".join(f"{v.name}: {v.current_replicas}/{v.desired_replicas}" for v in ep.variants)
    out.print(f"endpoint [bold]{name}[/bold] is {ep.status} ({counts} healthy/desired)", highlight=False)


@app.command("autoscale")
def autoscale_command(
    name: str = typer.Argument(..., help="Endpoint name."),
    bounds: str | None = typer.Option(
        None, "--autoscale", help="MIN..MAX replicas, target tracking on concurrent requests per replica."
    ),
    target_concurrency: float = typer.Option(
        4.0, "--target-concurrency", min=0.1, help="Concurrent requests per replica to keep."
    ),
    target_backlog: float | None = typer.Option(
        None, "--target-backlog", min=0.1, help="Async endpoints: jobs per replica to keep (default: K)."
    ),
    off: bool = typer.Option(False, "--off", help="Remove the policy (fixed replica counts)."),
) -> None:
    """Apply an autoscaling policy to a running endpoint (or remove it with --off). An async
    endpoint scales on its backlog per replica, down to 0 when MIN is 0."""
    from twinserve.deploy.policies import TargetTrackingPolicy

    if (bounds is None) == (not off):
        fail("give --autoscale MIN..MAX or --off", 2)
    platform = _platform(name)
    policy = None
    if bounds is not None:
        asynchronous = _describe(platform, name).config.async_inference
        if asynchronous is not None:
            target = target_backlog or asynchronous.max_concurrent_invocations_per_replica
            rule = _target_tracking(bounds, target, "backlog_per_replica")
        else:
            rule = _target_tracking(bounds, target_concurrency)
        policy = TargetTrackingPolicy.model_validate(rule)
    ep = _run_operation(
        f"autoscaling endpoint {name!r}",
        lambda progress: platform.set_autoscaling(name, policy, progress=progress),
    )
    p = ep.config.autoscaling
    state = f"{p.min_replicas}..{p.max_replicas} replicas" if p else "off"
    out.print(f"endpoint [bold]{name}[/bold]: autoscaling {state}", highlight=False)


@app.command("reconcile")
def reconcile_command(
    name: str | None = typer.Argument(None, help="Endpoint name (default: every endpoint)."),
    every: bool = typer.Option(False, "--all", help="Every local endpoint (what no name does too)."),
) -> None:
    """Repair after a crash or a reboot: recover interrupted operations, replace dead replicas,
    restart the router (same URL) and the controller. One endpoint's failure does not stop the
    others (exit 1 at the end)."""
    from twinserve.errors import NotFoundError, TwinserveError

    if name and every:
        fail("name an endpoint or pass --all, not both", 2)
    if name:
        manager = _local(name)
        names = [name]
    else:
        manager = _manager()
        names = [e.name for e in manager.store.list_endpoints() if e.config.platform.type == "local"]
    failed = 0
    for each in names:
        try:
            actions = manager.reconcile(
                each, ensure_controller=True, progress=lambda m: err.print(f"[dim]{m}[/dim]")
            )
        except NotFoundError as exc:
            if name:
                fail(exc.message)
            continue  # deleted since the list was read
        except TwinserveError as exc:
            failed += 1
            err.print(f"[red]{each}: {exc.message}[/red]", highlight=False)
            continue
        out.print(f"{each}: {'; '.join(actions) if actions else 'nothing to do'}", highlight=False)
    if failed:
        raise typer.Exit(1)


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

    from twinserve.deploy.spec import EndpointConfig
    from twinserve.platforms.sagemaker.scaling import sagemaker_scaling_calls

    if (name is None) == (config is None):
        fail("give an endpoint NAME or --config FILE.yaml", 2)
    if config is not None:
        try:
            cfg = EndpointConfig.from_yaml(config)
        except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
            fail(f"invalid endpoint config: {exc}", 2)
    else:
        cfg = _describe(_platform(name or ""), name or "").config
    if cfg.autoscaling is None:
        fail(f"endpoint {cfg.name!r} has no autoscaling policy", 2)
    try:
        calls = sagemaker_scaling_calls(cfg, endpoint_name=sagemaker_name)
    except ValueError as exc:
        fail(str(exc), 2)
    typer.echo(json.dumps([c.model_dump() for c in calls], indent=2))


@app.command("delete")
def delete_command(name: str = typer.Argument(..., help="Endpoint name.")) -> None:
    """Remove everything the endpoint runs (locally: drain and stop the router and the replicas;
    on SageMaker: scaling, alarms, endpoint, configs, models), then forget it (a missing one is fine)."""
    from twinserve.errors import NotFoundError, TwinserveError
    from twinserve.platforms import platform_of

    try:
        platform = platform_of(name)
    except NotFoundError:
        out.print(f"endpoint {name!r} does not exist; nothing to do")
        return
    with err.status(f"deleting endpoint {name!r}") as status:

        def progress(message: str) -> None:
            err.print(f"[dim]{message}[/dim]", highlight=False)
            status.update(message)

        try:
            deleted = platform.delete(name, progress=progress)
        except TwinserveError as exc:
            fail(exc.message)
    out.print(f"endpoint {name!r} deleted" if deleted else f"endpoint {name!r} does not exist; nothing to do")


@app.command("logs")
def logs_command(
    name: str = typer.Argument(..., help="Endpoint name."),
    lines: int = typer.Option(50, "--lines", "-n", min=1, help="Last lines of each log."),
) -> None:
    """The last lines of each log: replicas, router, controller (local) or CloudWatch streams (sagemaker)."""
    from twinserve.errors import TwinserveError

    try:
        logs = _platform(name).logs(name, lines)
    except TwinserveError as exc:
        fail(exc.message)
    for source, text in logs.items():
        out.print(f"[bold]==> {source} <==[/bold]", highlight=False)
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        sys.stdout.flush()
