"""`twinserve bench speculate`: W1 with prompt-lookup speculation and without, same engine, same run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)

# the goal on the copy-heavy workload: W1 tok/s with speculation ÷ without
COPY_GOAL = 1.5


def speculate_command(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model folder (default: the default model)."
    ),
    dtype: str = typer.Option("auto", "--dtype"),
    quantize: str | None = typer.Option(None, "--quantize"),
    threads: int = typer.Option(2, "--threads", min=1),
    speculate: int = typer.Option(5, "--speculate", min=1, help="Draft tokens per step."),
    requests: int = typer.Option(3, "--requests", min=1, help="Requests per workload and side."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=2),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """One stream, greedy: copy-heavy and plain chat prompts with speculation and without, in turn."""
    from twinserve.bench.speculate_bench import SpeculateBenchConfig, run_speculate_bench
    from twinserve.registry.default_model import ensure_default_model

    cfg = SpeculateBenchConfig.model_validate(
        {
            "model": str(model or ensure_default_model()),
            "dtype": dtype,
            "quantize": quantize,
            "threads": threads,
            "speculate": speculate,
            "requests": requests,
            "max_new_tokens": max_new_tokens,
        }
    )
    with err.status("benchmarking …") as status:
        report = run_speculate_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    if as_json:
        out.print_json(report.model_dump_json())
        return
    table = Table(title=f"prompt-lookup speculation, W1 ({report.dtype}, --speculate {cfg.speculate})")
    for col in (
        "workload",
        "tok/s with",
        "tok/s without",
        "ratio",
        "TTFT ms with / without",
        "accepted",
        "same output",
    ):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for w in report.workloads:
        goal = f" (goal ≥ {COPY_GOAL}x)" if w.workload == "copy" else ""
        table.add_row(
            w.workload,
            f"{w.speculating.tokens_per_s:.1f}",
            f"{w.plain.tokens_per_s:.1f}",
            f"{w.ratio:.2f}x{goal}",
            f"{w.speculating.ttft_ms_p50:.0f} / {w.plain.ttft_ms_p50:.0f}",
            f"{w.acceptance:.0%} of {w.draft_tokens}",
            "yes" if w.answers_differing == 0 else f"[red]{w.answers_differing} differ[/red]",
        )
    out.print(table)
