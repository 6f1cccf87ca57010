"""How `twinserve endpoint describe` shows an endpoint, whatever platform runs it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from twinserve.deploy.platform import Platform
    from twinserve.deploy.spec import Endpoint, ScalingEvent, VariantConfig


def _model_cell(cfg: VariantConfig) -> str:
    """The reference the user gave and the exact version it was pinned to at deploy time."""
    if cfg.pinned is None or cfg.pinned.label == cfg.model:
        return cfg.model
    return f"{cfg.model} → {cfg.pinned.label}"


def render_endpoint(out: Console, ep: Endpoint, platform: Platform, events: list[ScalingEvent]) -> None:
    """Status, URL, variants (reference → pinned version), replicas, policy, events, failure."""
    out.print(
        f"[bold]{ep.name}[/bold]  platform: {platform.name}  status: {ep.status}  url: {ep.url or '-'}",
        highlight=False,
    )
    out.print(f"created {ep.created_at:%Y-%m-%d %H:%M:%S} UTC, updated {ep.updated_at:%Y-%m-%d %H:%M:%S} UTC")
    _platform_lines(out, ep, platform)
    if ep.operation:
        out.print(
            f"operation in progress: {ep.operation} ({ep.operation_holder.describe() if ep.operation_holder else 'no holder'})"
        )
    if ep.target is not None:
        models = ", ".join(f"{v.name}={_model_cell(v)}" for v in ep.target.variants)
        out.print(f"rolling out generation {ep.generation + 1} ({models}): {ep.target_share:.0%} of traffic")
    variants = Table("variant", "model (pinned)", "weight", "desired", "current", title="variants")
    for v in ep.variants:
        cfg = ep.config.variant(v.name)
        variants.add_row(
            v.name, _model_cell(cfg), f"{cfg.weight:g}", str(v.desired_replicas), str(v.current_replicas)
        )
    out.print(variants)
    if ep.replicas:
        replicas = Table(
            "replica", "variant", "gen", "state", "pid", "port", "model version", title="replicas"
        )
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
    if ep.resources:
        resources = Table("kind", "name", title=f"{platform.name} resources")
        for kind, value in ep.resources.items():
            resources.add_row(kind, value)
        out.print(resources)
    if ep.config.async_inference is not None:
        _async_lines(out, ep)
    if ep.config.autoscaling is not None:
        p = ep.config.autoscaling
        bound = f"{p.min_replicas}..{p.max_replicas}"
        rule = f"target {p.target:g}" if p.type == "target_tracking" else f"threshold {p.threshold:g}"
        out.print(f"autoscaling: {p.type} on {p.metric}, {rule}, replicas {bound}", highlight=False)
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


def _platform_lines(out: Console, ep: Endpoint, platform: Platform) -> None:
    from twinserve.platforms.local.platform import LocalPlatform

    if isinstance(platform, LocalPlatform):
        router = "up" if platform.router_alive(ep) else "[red]down[/red]"
        controller = "up" if platform.controller_alive(ep) else "[yellow]not running[/yellow]"
        jobs = ""
        if ep.config.async_inference is not None:
            jobs = "  job service: " + ("up" if platform.job_service.alive(ep) else "[red]down[/red]")
        out.print(
            f"generation {ep.generation}  router: {router}{jobs}  controller: {controller}", highlight=False
        )
        gateway = platform.runtime_api_url()
        if gateway is not None:
            out.print(
                f'SageMaker Runtime API: boto3.client("sagemaker-runtime", endpoint_url="{gateway}")'
                f'.invoke_endpoint(EndpointName="{ep.name}", ...)',
                highlight=False,
                soft_wrap=True,
            )
    else:
        out.print(f"generation {ep.generation}", highlight=False)


def _async_lines(out: Console, ep: Endpoint) -> None:
    """The async settings (webhooks by host only: their URLs may carry tokens) and the backlog."""
    from urllib.parse import urlsplit

    import httpx

    a = ep.config.async_inference
    assert a is not None
    hooks = [
        f"{label} → {urlsplit(url).hostname}"
        for label, url in (("success", a.notify_success_url), ("error", a.notify_error_url))
        if url
    ]
    hooks += [
        f"{label} → SNS {arn.rsplit(':', 1)[-1]}"
        for label, arn in (("success", a.success_topic_arn), ("error", a.error_topic_arn))
        if arn
    ]
    out.print(
        f"async: {a.max_concurrent_invocations_per_replica} job(s) per replica, results "
        f"{a.output_location or 'in the endpoint folder'}, webhooks {', '.join(hooks) or 'none'}"
        f"{' (signed)' if a.notify_secret else ''}, ttl {a.request_ttl_s:g}s, "
        f"timeout {a.invocation_timeout_s:g}s, {a.max_attempts} attempt(s)",
        highlight=False,
        soft_wrap=True,
    )
    if ep.async_url is None:
        return
    try:
        stats = httpx.get(f"{ep.async_url}/async/stats", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        out.print("queue: [yellow]the job service did not answer[/yellow]")
        return
    counts = ", ".join(f"{k} {v}" for k, v in stats.get("counts", {}).items())
    out.print(f"queue: backlog {stats.get('backlog', '?')} ({counts})", highlight=False)
