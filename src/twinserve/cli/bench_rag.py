"""`twinserve bench rag`: parse options, run the RAG benchmark, print a table or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # the bench pulls in the RAG stack: imported when the command runs
    from twinserve.bench.rag_bench import RagBenchReport

out = Console()
err = Console(stderr=True)


def rag_command(
    docs: Path | None = typer.Option(
        None, "--docs", file_okay=False, exists=True, help="Folder to ingest (default: this project's docs/)."
    ),
    model: str = typer.Option("default", "--model", "-m", help="Served by the LLM and by the monolith."),
    llm: str | None = typer.Option(None, "--llm", help="A running LLM microservice instead of starting one."),
    requests: int = typer.Option(64, "--requests", min=1, help="/rag requests per mode."),
    concurrency: int = typer.Option(32, "--concurrency", min=1, help="Requests in flight."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    k: int = typer.Option(4, "--k", min=1, max=50, help="Chunks retrieved per question."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="/rag and direct take turns in this many parts."),
    no_monolith: bool = typer.Option(False, "--no-monolith", help="Skip `rag serve --model` (in-process)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """/rag at W32 vs the same prompts straight to the LLM, then as a monolith; ingest chunks/s."""
    from twinserve.bench.rag_bench import RagBenchConfig, run_rag_bench
    from twinserve.cli.up_rag import project_docs
    from twinserve.errors import TwinserveError

    docs = docs or project_docs()
    if docs is None:
        raise typer.BadParameter("no docs/ folder found here: give --docs PATH", param_hint="--docs")
    cfg = RagBenchConfig(
        docs=docs.resolve(),
        model=model,
        llm_url=llm,
        requests=requests,
        concurrency=concurrency,
        max_new_tokens=max_new_tokens,
        k=k,
        rounds=rounds,
        monolith=not no_monolith,
    )
    try:
        with err.status("benchmarking …") as status:
            report = run_rag_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    except TwinserveError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        print_report(report)
    for part, reason in report.errors.items():
        err.print(f"[red]{part} failed:[/red] {reason}", highlight=False, soft_wrap=True)
    if report.errors or report.microservices.completed == 0 or report.direct.completed == 0:
        raise typer.Exit(1)


def print_report(report: RagBenchReport) -> None:
    cfg = report.config
    table = Table(
        title=f"bench rag: {cfg.requests} requests, {cfg.concurrency} in flight, "
        f"{cfg.max_new_tokens} new tokens, k={cfg.k} ({report.cpu_count} cores)"
    )
    for column in ("mode", "ok/failed", "p50 ms", "p90 ms", "retrieval p50", "prompt p50", "LLM p50"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in report.rows():
        table.add_row(*row)
    out.print(table)
    goals = Table(title="goals")
    for column in ("measure", "value", "goal", ""):
        goals.add_column(column)
    for measure, value, goal, met in report.goals():
        goals.add_row(
            measure,
            value,
            goal,
            "" if met is None else "[green]meets[/green]" if met else "[red]misses[/red]",
        )
    out.print(goals)
    for mode in (report.microservices, report.direct, report.monolith):
        for kind, n in sorted((mode.errors if mode else {}).items()):
            err.print(f"[red]{mode.name if mode else ''}: {n} × {kind}[/red]", highlight=False)
