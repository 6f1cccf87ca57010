"""`twinserve bench serve`: parse options, run the serving benchmark, print a table or JSON."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError as PydanticValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from twinserve.bench.serve_bench import RequestRecord, ServeBenchConfig, ServeBenchReport, serve_bench
from twinserve.bench.stats import Distribution, Slo

out = Console()
err = Console(stderr=True)


def serve_command(
    url: str = typer.Option(..., "--url", help="Endpoint base URL, e.g. http://127.0.0.1:3000."),
    api: str = typer.Option("tgi", "--api", help="tgi (/generate_stream) or openai (/v1/completions)."),
    chat: bool = typer.Option(False, "--chat", help="Send prompts to /v1/chat/completions instead."),
    model: str | None = typer.Option(None, "--model", help="`model` field of OpenAI requests."),
    concurrency: int = typer.Option(32, "--concurrency", min=1, help="Requests in flight at most."),
    num_prompts: int = typer.Option(128, "--num-prompts", min=1, help="Measured requests."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    request_rate: float = typer.Option(
        float("inf"), "--request-rate", help="Requests/s, Poisson arrivals; inf sends all at once."
    ),
    prompts: Path | None = typer.Option(
        None,
        "--prompts",
        exists=True,
        dir_okay=False,
        help='JSONL: {"prompt": …} or {"messages": […]} per line.',
    ),
    ignore_eos: bool = typer.Option(
        True, "--ignore-eos/--no-ignore-eos", help="Generate exactly --max-new-tokens per request."
    ),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TWINSERVE_API_KEY", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Seeds prompt order and arrival times."),
    slo: str | None = typer.Option(None, "--slo", help="Goodput objectives, e.g. ttft_ms=500,tpot_ms=50."),
    warmup: int = typer.Option(0, "--warmup", min=0, help="Requests sent first, not measured."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds without a byte before a request fails."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Load-test a running TGI or OpenAI endpoint: TTFT, TPOT, ITL, E2E, throughput, goodput."""
    try:
        cfg = ServeBenchConfig.model_validate(
            {
                "url": url,
                "api": api,
                "chat": chat,
                "model": model,
                "concurrency": concurrency,
                "num_prompts": num_prompts,
                "max_new_tokens": max_new_tokens,
                "request_rate": request_rate,
                "prompts_file": prompts,
                "ignore_eos": ignore_eos,
                "api_key": api_key,
                "seed": seed,
                "slo": Slo.parse(slo) if slo else None,
                "warmup": warmup,
                "timeout": timeout,
            }
        )
    except (PydanticValidationError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        report = _run(cfg, show_progress=not as_json and err.is_terminal)
    except ValueError as exc:  # a malformed prompts file
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        print_report(report)
    if report.completed == 0:
        raise typer.Exit(1)


def _run(cfg: ServeBenchConfig, *, show_progress: bool) -> ServeBenchReport:
    progress = (
        Progress(
            TextColumn("[bold]bench serve"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        if show_progress
        else None
    )
    with progress or nullcontext():
        if progress is None:
            return serve_bench(cfg)
        task = progress.add_task("requests", total=cfg.num_prompts, failed=0)
        failed = 0

        def advance(record: RequestRecord) -> None:
            nonlocal failed
            failed += not record.ok
            progress.update(task, advance=1, failed=failed)

        return serve_bench(cfg, advance)


def print_report(report: ServeBenchReport) -> None:
    cfg = report.config
    rate = "inf" if cfg.request_rate == float("inf") else f"{cfg.request_rate:g}/s"
    route = "chat" if cfg.chat else cfg.api
    summary = Table(
        title=f"bench serve: {route}, concurrency {cfg.concurrency}, rate {rate}", caption=cfg.url
    )
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("completed", report.completed),
        ("failed", report.failed),
        *((f"  {kind}", n) for kind, n in sorted(report.errors.items())),
        ("duration (s)", f"{report.duration_s:.2f}"),
        ("request throughput (req/s)", f"{report.request_throughput:.2f}"),
        ("output token throughput (tok/s)", f"{report.output_token_throughput:.1f}"),
        ("total input tokens", report.total_input_tokens),
        (f"total output tokens (by {report.tokens_counted_by})", report.total_output_tokens),
    ]
    if report.goodput is not None:
        rows.append((f"goodput (req/s, {report.good_requests} met the SLO)", f"{report.goodput:.2f}"))
    for name, value in rows:
        summary.add_row(name, str(value))
    out.print(summary)

    latency = Table(title="latency (ms)")
    for col in ("metric", "mean", "p50", "p90", "p99", "n"):
        latency.add_column(col, justify="left" if col == "metric" else "right")
    dists: list[tuple[str, Distribution | None]] = [
        ("TTFT", report.ttft_ms),
        ("TPOT", report.tpot_ms),
        ("ITL", report.itl_ms),
        ("E2E", report.e2e_ms),
    ]
    for name, d in dists:
        if d is None:
            latency.add_row(name, "-", "-", "-", "-", "0")
        else:
            latency.add_row(name, *(f"{v:.1f}" for v in (d.mean, d.p50, d.p90, d.p99)), str(d.count))
    out.print(latency)
    for kind, message in sorted(report.error_messages.items()):
        out.print(f"[red]{kind}[/red]: {message}")
