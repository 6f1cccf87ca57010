"""A plan for people: rich tables with the arithmetic shown, and the EndpointConfig as YAML.

The tables repeat every number with how it was computed (params × bytes, layers × heads ×
dims), so a reviewer can check the plan with a calculator. The YAML is exactly what
`twinserve endpoint create NAME --config FILE` reads, headed by comments that carry what
EndpointConfig has no field for (instance type, SM_NUM_GPUS, price).
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from twinserve.planner.deployment import DeploymentType
from twinserve.planner.plan import Plan
from twinserve.planner.sizing import (
    ACTIVATION_FRACTION,
    CPU_MEMORY_FRACTION,
    DTYPE_BYTES,
    GIB,
    GPU_MEMORY_FRACTION,
    HOST_LOAD_MARGIN_GIB,
    RUNTIME_OVERHEAD_GIB,
    linear_bytes,
)


def _money(usd: float) -> str:
    """A total, to the cent (half up: $1.515 shows as $1.52, not the float's $1.51)."""
    return f"${usd + 1e-9:,.2f}"


def _price(usd: float) -> str:
    """A list price with the digits AWS publishes ($1.515, $0.2142, $37.688)."""
    return "$" + f"{usd:,.4f}".rstrip("0").rstrip(".")


def _count(n: int) -> str:
    """A parameter count people read at a glance: 8.03 B, 134.5 M."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", show_header=bool(columns))
    for i, name in enumerate(columns or ("", "")):
        table.add_column(name, style="cyan" if i == 0 else None, overflow="fold")
    return table


def recommendation_table(plan: Plan) -> Table:
    """The answer: deployment type, instance, replicas, cost, autoscaling, model reference."""
    inst, req = plan.instance, plan.request
    table = _table(f"Plan for {req.model.name} ({_count(req.model.params)} parameters)")
    table.add_row("deployment", f"[bold]{plan.deployment.type}[/bold]: {plan.deployment.reason}")
    gpus = f", SM_NUM_GPUS={inst.num_gpus}" if inst.num_gpus else ""
    table.add_row("instance", f"[bold]{inst.instance_type}[/bold] ({inst.hardware}{gpus})")
    if plan.batch is not None:
        b = plan.batch
        table.add_row("instances", f"{b.instances} for the job, ≈ {b.hours:.2f} h")
        table.add_row(
            "cost",
            f"≈ {_money(b.usd)} for the run ({_price(inst.usd_per_hour)}/h per instance, on-demand "
            f"{inst.price_region}, prices of {inst.price_date})",
        )
    else:
        table.add_row(
            "replicas",
            f"{inst.replicas} for {req.requests_per_s:g} req/s (max {inst.max_replicas} at {req.peak_factor:g}× peak)",
        )
        table.add_row(
            "cost",
            f"{_money(inst.usd_per_hour_total)}/h = {inst.replicas} × {_price(inst.usd_per_hour)}/h, "
            f"≈ {_money(inst.usd_per_month)}/month (on-demand {inst.price_region}, prices of {inst.price_date})",
        )
    if plan.autoscaling is not None:
        a = plan.autoscaling
        span = (
            f"{a.min_replicas}–{a.max_replicas}" if a.max_replicas > a.min_replicas else f"{a.min_replicas}"
        )
        table.add_row(
            "autoscaling",
            f"target tracking: {a.target:g} concurrent requests per replica, {span} replica(s), "
            f"scale-out cooldown {a.scale_out_cooldown_s:g} s, scale-in {a.scale_in_cooldown_s:g} s",
        )
    ref = (
        f"{plan.model_ref} [yellow](placeholder)[/yellow]"
        if plan.model_ref_is_placeholder
        else plan.model_ref
    )
    table.add_row("model", f"{ref}; {req.model.source}")
    return table


def criteria_table(plan: Plan) -> Table:
    """Why this deployment type, along latency, throughput, data size and infrastructure."""
    table = _table(f"Why {plan.deployment.type}", "criterion", "assessment")
    for c in plan.deployment.criteria:
        table.add_row(c.name, c.assessment)
    return table


def memory_table(plan: Plan) -> Table:
    """Memory of one replica, term by term, with the formula of each."""
    m, shape, q = plan.memory, plan.request.model, plan.request.quantize
    per = "GPU" if m.device == "cuda" else "host"
    table = _table(f"Memory per {per} ({m.dtype})", "term", "GiB", "how")
    split = f" ÷ {m.devices} GPUs" if m.devices > 1 else ""
    if q is None:
        how = f"{_count(shape.params)} params × {DTYPE_BYTES[m.dtype]} B ({m.dtype}){split}"
    else:
        how = (
            f"{_count(shape.linear_params)} linear params × {linear_bytes(m.dtype, q):g} B ({q}) + "
            f"{_count(shape.params - shape.linear_params)} others × {DTYPE_BYTES[m.dtype]} B{split}"
        )
    how += f"; {m.weights_total_gib * GIB / 1e9:.2f} GB in all"
    table.add_row("weights", f"{m.weights_gib:.2f}", how)
    table.add_row(
        "KV cache per token",
        f"{m.kv_bytes_per_token_per_device / 1024:.1f} KiB",
        f"2 × {shape.num_layers} layers × {shape.num_kv_heads} KV heads × {shape.head_dim} dims × "
        f"{DTYPE_BYTES[m.dtype]} B = {m.kv_bytes_per_token / 1024:.1f} KiB{split}",
    )
    lim = plan.limits
    table.add_row(
        "KV cache, one request",
        f"{m.kv_one_request_gib:.2f}",
        f"MAX_TOTAL_TOKENS {lim.max_total_tokens} tokens",
    )
    table.add_row(
        "KV cache, batch budget",
        f"{m.kv_budget_gib:.2f}",
        f"MAX_BATCH_TOTAL_TOKENS {m.kv_budget_tokens} tokens",
    )
    context = "CUDA context + workspaces" if m.device == "cuda" else "Python, torch, server"
    table.add_row(
        "runtime overhead",
        f"{m.overhead_gib:.2f}",
        f"{RUNTIME_OVERHEAD_GIB:g} GiB {context} + max({ACTIVATION_FRACTION:.0%} of weights, "
        f"activations of a {lim.max_batch_prefill_tokens}-token prefill)",
    )
    table.add_row(
        "[bold]needed[/bold]", f"[bold]{m.need_gib:.2f}[/bold]", "weights + overhead + one request's KV"
    )
    table.add_row("planned", f"{m.planned_gib:.2f}", "weights + overhead + the batch KV budget")
    fraction = GPU_MEMORY_FRACTION if m.device == "cuda" else CPU_MEMORY_FRACTION
    table.add_row(
        "[bold]available[/bold]",
        f"[bold]{m.usable_gib:.2f}[/bold]",
        f"{fraction:.0%} of {m.device_memory_gib:g} GiB "
        + (
            "(nvidia-smi total; the rest for fragmentation)"
            if m.device == "cuda"
            else "host RAM (OS, page cache)"
        ),
    )
    if m.device == "cuda":
        table.add_row(
            "host RAM",
            f"{m.host_memory_gib:g}",
            f"≥ {m.host_need_gib:.1f} needed to load the weights (all of them + {HOST_LOAD_MARGIN_GIB:g} GiB)",
        )
    return table


def limits_table(plan: Plan) -> Table:
    """The container environment: TGI's names, as the SageMaker HF LLM (TGI) image reads them."""
    table = _table("Container environment (TGI names)", "variable", "value")
    for name, value in plan.sagemaker_env.items():
        table.add_row(name, value)
    return table


def performance_table(plan: Plan) -> Table:
    """Roofline estimates of one replica at its operating point."""
    s, req, lim = plan.speed, plan.request, plan.limits
    table = _table("Estimated performance per replica", "metric", "value")
    table.add_row("requests decoded together", f"{s.concurrency} (limited by {s.limited_by})")
    slo = plan.deployment.type is DeploymentType.REAL_TIME
    table.add_row(
        "TTFT",
        f"{s.ttft_ms:.0f} ms ({req.prompt_tokens}-token prompt)"
        + (f", SLO {req.ttft_slo_ms:g} ms" if slo else ""),
    )
    table.add_row(
        "TTFT, longest prompt", f"{s.ttft_max_input_ms:.0f} ms (MAX_INPUT_TOKENS {lim.max_input_tokens})"
    )
    table.add_row(
        "TPOT",
        f"{s.tpot_ms:.1f} ms (decode step {s.step_ms:.1f} ms)"
        + (f", SLO {req.tpot_slo_ms:g} ms" if slo else ""),
    )
    table.add_row("end to end", f"{s.e2e_s:.1f} s ({req.output_tokens} output tokens)")
    table.add_row("throughput", f"{s.requests_per_s:.2f} req/s, {s.output_tokens_per_s:,.0f} output tokens/s")
    if plan.endpoint_concurrency is not None:
        table.add_row(
            "in flight, whole endpoint",
            f"{plan.endpoint_concurrency:.1f} requests = {req.requests_per_s:g} req/s × {s.e2e_s:.1f} s (Little's law)",
        )
    return table


def candidates_table(plan: Plan) -> Table:
    """Every instance considered, cheapest first, with why each lost."""
    batch = plan.batch is not None
    table = _table(
        "Instances considered", "instance", "hardware", "fits", "replicas", "$ run" if batch else "$/h", "why"
    )
    for c in plan.candidates:
        mark = "[green]yes[/green]" if c.fits else "[red]no[/red]"
        cost = _money(c.cost_usd) if c.cost_usd is not None else "–"
        name = (
            f"[bold]{c.instance_type}[/bold]"
            if c.instance_type == plan.instance.instance_type
            else c.instance_type
        )
        table.add_row(name, c.hardware, mark, str(c.replicas or "–"), cost, c.note)
    return table


def print_plan(plan: Plan, console: Console) -> None:
    """All tables, then the notes."""
    for table in (
        recommendation_table(plan),
        criteria_table(plan),
        memory_table(plan),
        limits_table(plan),
        performance_table(plan),
        candidates_table(plan),
    ):
        console.print(table)
        console.print()
    for note in plan.notes:
        console.print(f"[dim]• {note}[/dim]", highlight=False)


def plan_yaml(plan: Plan) -> str:
    """The EndpointConfig as YAML, headed by comments with what it has no field for."""
    inst = plan.instance
    gpus = f", SM_NUM_GPUS={inst.num_gpus}" if inst.num_gpus else ""
    header = [
        f"# EndpointConfig written by `twinserve plan` for {plan.request.model.name}. Create the endpoint with:",
        f"#   twinserve endpoint create {plan.endpoint_config.name} --config THIS_FILE.yaml",
        f"# Plan: {plan.deployment.type} on {inst.replicas}× {inst.instance_type} ({inst.hardware}{gpus}),",
        f"#   ${inst.usd_per_hour_total:,.2f}/h on-demand {inst.price_region} (prices of {inst.price_date}).",
        "# Instance type, SM_NUM_GPUS and price belong to the plan (`twinserve plan --json`); this",
        "# config has no field for them.",
    ]
    if plan.model_ref_is_placeholder:
        header.append(
            f"# model: {plan.model_ref} is a placeholder (no --model given): register it or edit it."
        )
    return "\n".join(header) + "\n" + plan.endpoint_config.to_yaml()
