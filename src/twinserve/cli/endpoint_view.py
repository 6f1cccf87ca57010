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
        out.print(f"operation in progress: {ep.operation} (pid {ep.operation_pid})")
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
        out.print(f"generation {ep.generation}  router: {router}  controller: {controller}", highlight=False)
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
