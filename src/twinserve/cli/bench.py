"""`twinserve bench …`: benchmarks that print ratios against a baseline run side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from twinserve.cli import bench_rag, bench_serve, bench_speculate

if TYPE_CHECKING:  # the engine bench pulls in torch: imported when that command runs
    from twinserve.bench.engine_bench import EngineBenchReport
    from twinserve.bench.prefix_bench import PrefixBenchReport

app = typer.Typer(
    help=(
        "Benchmarks: the engine against transformers (engine), a running endpoint under load (serve), "
        "the RAG service in front of an LLM (rag), the prefix cache on and off (prefix), prompt-lookup "
        "speculation on and off (speculate), kill -9 during endpoint operations (chaos)."
    ),
    no_args_is_help=True,
)
app.command("serve")(bench_serve.serve_command)
app.command("rag")(bench_rag.rag_command)
app.command("speculate")(bench_speculate.speculate_command)
out = Console()
err = Console(stderr=True)

# targets of the engine issue, as ratios to the baseline measured in the same run
TARGETS = {
    "W_throughput": 2.0,
    "W1_tokens_per_s": 2.0,
    "ttft_vs_prefill": 1.0,
    "W1_vs_peer": 1.0,
    "ttft_vs_peer": 1.0,
}
AT_MOST = ("ttft_vs_prefill", "ttft_vs_peer")  # ratios of latencies: lower is better


@app.command("engine")
def engine_command(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model folder (default: the default model)."
    ),
    dtype: str = typer.Option("auto", "--dtype"),
    quantize: str | None = typer.Option(None, "--quantize"),
    threads: int = typer.Option(2, "--threads", min=1),
    concurrency: int = typer.Option(32, "--concurrency", min=1),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=2),
    w1_requests: int = typer.Option(3, "--w1-requests", min=1),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip transformers generate."),
    peer: str | None = typer.Option(
        None,
        "--peer",
        help="llama-cpp: also run llama.cpp on W1 and TTFT (pip install 'twinserve\\[bench]').",
    ),
    peer_gguf: Path | None = typer.Option(
        None, "--peer-gguf", help="GGUF for the peer (default: the default model's own Q4_1 GGUF)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """W32 / W1 / TTFT of the engine vs HF `generate` (static padded batches), same prompts, same run."""
    is_default = model is None
    model = _model_or_default(model)
    from twinserve.bench.engine_bench import EngineBenchConfig, run_engine_bench

    if peer is not None and peer_gguf is None:
        if not is_default:
            raise typer.BadParameter("give --peer-gguf: the GGUF of the model given with --model")
        from twinserve.registry.default_model import default_model_gguf

        peer_gguf = default_model_gguf()

    cfg = EngineBenchConfig.model_validate(
        {
            "model": str(model),
            "dtype": dtype,
            "quantize": quantize,
            "threads": threads,
            "concurrency": concurrency,
            "max_new_tokens": max_new_tokens,
            "w1_requests": w1_requests,
            "baseline": not no_baseline,
            "peer": peer,
            "peer_gguf": None if peer_gguf is None else str(peer_gguf),
        }
    )
    with err.status("benchmarking …") as status:
        report = run_engine_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    if as_json:
        out.print_json(report.model_dump_json())
        return
    _print_report(report)


def _print_report(report: EngineBenchReport) -> None:
    table = Table(title=f"engine benchmark ({report.dtype}, {report.config.threads} threads)")
    for col in ("workload", "system", "requests", "tokens", "seconds", "tok/s", "TTFT p50 ms", "ITL p50 ms"):
        table.add_column(col, justify="right" if col not in ("workload", "system") else "left")
    for r in report.results:
        table.add_row(
            r.name,
            r.system,
            str(r.requests),
            str(r.output_tokens),
            f"{r.seconds:.2f}",
            f"{r.tokens_per_s:.1f}",
            "" if r.ttft_ms_p50 is None else f"{r.ttft_ms_p50:.0f}",
            "" if r.itl_ms_p50 is None else f"{r.itl_ms_p50:.1f}",
        )
    out.print(table)
    out.print(f"peak RSS during W{report.config.concurrency}: {report.peak_rss_mb_w32:.0f} MB")
    out.print(
        f"TTFT, {report.config.ttft_prompt_tokens}-token prompt: {report.ttft_ms:.0f} ms"
        + (
            ""
            if report.baseline_prefill_ms is None
            else f" (transformers prefill: {report.baseline_prefill_ms:.0f} ms)"
        )
        + ("" if report.peer_ttft_ms is None else f" (peer: {report.peer_ttft_ms:.0f} ms)")
    )
    for name, value in report.ratios.items():
        target = TARGETS.get("W_throughput" if name.endswith("_throughput") else name)
        better = value <= target if name in AT_MOST else value >= target  # type: ignore[operator]
        mark = "" if target is None else (" [green]meets[/green]" if better else " [red]misses[/red]")
        out.print(f"{name}: {value:.2f}x (target {'≤' if name in AT_MOST else '≥'} {target}x){mark}")


@app.command("http-overhead")
def http_overhead_command(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model folder (default: the default model)."
    ),
    dtype: str = typer.Option("auto", "--dtype"),
    threads: int = typer.Option(2, "--threads", min=1),
    concurrency: int = typer.Option(32, "--concurrency", min=1),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=2),
    rounds: int = typer.Option(2, "--rounds", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """The same W32 in-process and over HTTP (streaming chat), interleaved: what serving costs."""
    from twinserve.bench.http_overhead import HttpOverheadConfig, run_http_overhead_bench

    model = _model_or_default(model)
    cfg = HttpOverheadConfig.model_validate(
        {
            "model": str(model),
            "dtype": dtype,
            "threads": threads,
            "concurrency": concurrency,
            "max_new_tokens": max_new_tokens,
            "rounds": rounds,
        }
    )
    with err.status("benchmarking …") as status:
        report = run_http_overhead_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    if as_json:
        out.print_json(report.model_dump_json())
        return
    table = Table(title=f"W{concurrency}: in-process engine vs HTTP (OpenAI chat, streaming)")
    for column in (
        "round",
        "in-process tok/s",
        "HTTP tok/s",
        "HTTP ÷ in-process",
        "TTFT p50 in-process",
        "TTFT p50 HTTP",
    ):
        table.add_column(column, justify="right")
    for i, r in enumerate(report.rounds, 1):
        table.add_row(
            str(i),
            f"{r.in_process.tokens_per_s:.1f}",
            f"{r.http.tokens_per_s:.1f}",
            f"{r.ratio:.2f}",
            f"{r.in_process.ttft_ms_p50:.0f} ms",
            f"{r.http.ttft_ms_p50:.0f} ms",
        )
    out.print(table)
    out.print(
        f"median throughput ratio {report.throughput_ratio_median:.2f} (target ≥ 0.90); "
        f"HTTP p50 TTFT {report.http_ttft_ms_p50:.0f} ms (target ≤ 300 ms)"
    )


@app.command("endpoint")
def endpoint_command(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Registry reference or model folder (default: the default model)."
    ),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Router part: interleaved rounds."),
    concurrency: int = typer.Option(32, "--concurrency", min=1, help="Router part: requests in flight."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=2),
    only: list[str] = typer.Option(
        [], "--only", help="router, update or scale; repeatable or a comma list (default: all three)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    platform: str = typer.Option(
        "local", "--platform", help="ray: W32 through Serve's proxy vs straight to a local replica."
    ),
    ray_address: str = typer.Option("auto", "--ray-address", help="--platform ray: the cluster."),
) -> None:
    """A local endpoint: router overhead at W32, failed requests during an update, load spike → new replica."""
    from twinserve.bench.endpoint_bench import PARTS, EndpointBenchConfig, run_endpoint_bench

    if platform not in ("local", "ray"):
        raise typer.BadParameter(f"--platform is local or ray, not {platform!r}")
    parts = [p.strip() for item in only for p in item.split(",") if p.strip()] or list(PARTS)
    if platform == "ray":
        if set(parts) - {"router"} and only:
            raise typer.BadParameter("--platform ray measures the proxy only (--only router)")
        parts = ["router"]
    if unknown := sorted(set(parts) - set(PARTS)):
        raise typer.BadParameter(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if model is None:
        model = str(_model_or_default(None))
    elif not model.startswith("models:/") and Path(model).exists():
        model = str(Path(model).resolve())  # replicas run elsewhere than the caller's folder
    cfg = EndpointBenchConfig.model_validate(
        {
            "model": model,
            "rounds": rounds,
            "concurrency": concurrency,
            "max_new_tokens": max_new_tokens,
            "parts": [p for p in PARTS if p in parts],
            "platform": platform,
            "ray_address": ray_address,
        }
    )
    with err.status("benchmarking …") as status:
        report = run_endpoint_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        if report.router is not None:
            hop = "Serve's proxy" if platform == "ray" else "the router"
            table = Table(title=f"W{concurrency} through {hop} and straight to the replica")
            columns = "round|first|router tok/s|direct tok/s|router ÷ direct|TTFT p50 router|TTFT p50 direct"
            if platform == "ray":
                columns = columns.replace("router", "proxy")
            for column in columns.split("|"):
                table.add_column(column, justify="right")
            for i, r in enumerate(report.router.rounds, 1):
                table.add_row(
                    str(i),
                    "proxy" if platform == "ray" and r.first == "router" else r.first,
                    f"{r.router.tokens_per_s:.1f}",
                    f"{r.direct.tokens_per_s:.1f}",
                    f"{r.ratio:.3f}",
                    f"{r.router.ttft_ms_p50:.0f} ms",
                    f"{r.direct.ttft_ms_p50:.0f} ms",
                )
            out.print(table)
        out.print(
            _summary(
                f"endpoint benchmark ({report.config.model}, {report.cpu_count} cores)", report.summary()
            )
        )
        for part, reason in report.errors.items():
            err.print(f"[red]{part} failed:[/red] {reason}", highlight=False)
    if report.errors:
        raise typer.Exit(1)


@app.command("prefix")
def prefix_command(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Registry reference or model folder (default: the default model)."
    ),
    dtype: str = typer.Option("auto", "--dtype"),
    threads: int = typer.Option(2, "--threads", min=1, help="CPU threads of each server."),
    only: list[str] = typer.Option(
        [], "--only", help="chat or shared; repeatable or a comma list (default: both)."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    conversations: int = typer.Option(8, "--conversations", min=1, help="Chat: conversations at once."),
    turns: int = typer.Option(6, "--turns", min=1, help="Chat: turns per conversation."),
    shared_requests: int = typer.Option(
        32, "--shared-requests", min=1, help="Shared: requests per arrangement."
    ),
    wave_size: int = typer.Option(8, "--wave-size", min=1, help="Shared: requests per wave."),
    context_tokens: int = typer.Option(600, "--context-tokens", min=16, help="Shared: passage tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """The prefix cache on and off, two servers side by side: multi-turn chat TTFT, shared-context prefill."""
    from twinserve.bench.prefix_bench import PARTS, PrefixBenchConfig, run_prefix_bench

    parts = [p.strip() for item in only for p in item.split(",") if p.strip()] or list(PARTS)
    if unknown := sorted(set(parts) - set(PARTS)):
        raise typer.BadParameter(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if model is None:
        model = str(_model_or_default(None))
    elif not model.startswith("models:/") and Path(model).exists():
        model = str(Path(model).resolve())
    try:
        cfg = PrefixBenchConfig.model_validate(
            {
                "model": model,
                "dtype": dtype,
                "threads": threads,
                "parts": [p for p in PARTS if p in parts],
                "max_new_tokens": max_new_tokens,
                "conversations": conversations,
                "turns": turns,
                "shared_requests": shared_requests,
                "wave_size": wave_size,
                "context_tokens": context_tokens,
            }
        )
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with err.status("benchmarking …") as status:
        report = run_prefix_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    if as_json:
        out.print_json(report.model_dump_json())
        return
    _print_prefix_report(report)


def _print_prefix_report(report: PrefixBenchReport) -> None:
    if (chat := report.chat) is not None:
        table = Table(title="multi-turn chat, TTFT per turn (with the prefix cache vs without)")
        for column in ("turn", "first", "prompt tok", "cached", "p50 cache", "p50 none", "÷", "hit rate"):
            table.add_column(column, justify="right")
        for t in chat.turns:
            table.add_row(
                str(t.turn),
                t.first,
                str(t.cache.prompt_tokens),
                str(t.cache.cached_tokens),
                f"{t.cache.ttft_ms.p50:.0f} ms",
                f"{t.no_cache.ttft_ms.p50:.0f} ms",
                f"{t.cache.ttft_ms.p50 / t.no_cache.ttft_ms.p50:.2f}",
                f"{t.cache.metrics.hit_rate:.0%}",
            )
        out.print(table)
    if report.shared:
        table = Table(title="shared context: prefill computed (prompt − cached tokens), TTFT, total time")
        columns = "arrangement|context|prompt tok|computed cache|computed none|TTFT p50 cache|TTFT p50 none"
        for column in (*columns.split("|"), "s cache", "s none"):
            table.add_column(column, justify="left" if column == "arrangement" else "right")
        for a in report.shared:
            table.add_row(
                a.name,
                str(a.context_tokens),
                str(a.cache.prompt_tokens),
                f"{a.cache.computed_share:.0%}",
                f"{a.no_cache.computed_share:.0%}",
                f"{a.cache.ttft_ms.p50:.0f} ms",
                f"{a.no_cache.ttft_ms.p50:.0f} ms",
                f"{a.cache.seconds:.1f}",
                f"{a.no_cache.seconds:.1f}",
            )
        out.print(table)
    summary = _summary(
        f"prefix cache benchmark ({report.config.model}, {report.cpu_count} cores)", report.summary()
    )
    out.print(summary)
    for example in report.mismatch_examples:
        err.print(f"[yellow]differs:[/yellow] {example}", highlight=False)


@app.command("batch")
def batch_command(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model folder (default: the default model)."
    ),
    records: int = typer.Option(256, "--records", min=1),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    concurrency: int = typer.Option(32, "--concurrency", min=1, help="Real-time side: requests in flight."),
    batch_concurrency: int = typer.Option(
        64, "--batch-concurrency", min=1, help="Batch side: records in flight."
    ),
    threads: int = typer.Option(2, "--threads", min=1),
    dtype: str = typer.Option("auto", "--dtype"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Batch transform in-process vs the same chat records on `twinserve serve` (tokens/s, ratio)."""
    from twinserve.bench.batch_bench import BatchBenchConfig, run_batch_bench

    cfg = BatchBenchConfig.model_validate(
        {
            "model": str(_model_or_default(model)),
            "records": records,
            "max_new_tokens": max_new_tokens,
            "concurrency": concurrency,
            "batch_concurrency": batch_concurrency,
            "threads": threads,
            "dtype": dtype,
        }
    )
    with err.status("benchmarking …") as status:
        report = run_batch_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    if as_json:
        out.print_json(report.model_dump_json())
        return
    table = Table(title=f"{records} chat records × {max_new_tokens} new tokens, greedy, {threads} threads")
    for column in ("side", "in flight", "seconds", "generated tokens", "tok/s", "failed"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for name, side, flight in (
        ("batch transform (in-process)", report.batch, batch_concurrency),
        ("real-time server (HTTP, streaming)", report.realtime, concurrency),
    ):
        table.add_row(
            name,
            str(flight),
            f"{side.seconds:.1f}",
            str(side.generated_tokens),
            f"{side.tokens_per_s:.1f}",
            str(side.failed),
        )
    out.print(table)
    mark = "[green]meets[/green]" if report.ratio >= 1.1 else "[red]misses[/red]"
    out.print(f"batch ÷ real-time: {report.ratio:.2f}x (goal ≥ 1.1x) {mark}")


@app.command("async")
def async_command(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model folder (default: the default model)."
    ),
    jobs: int = typer.Option(200, "--jobs", min=1),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    max_replicas: int = typer.Option(2, "--max-replicas", min=1, help="Autoscaling bounds are 0..this."),
    max_concurrent_invocations: int = typer.Option(
        16, "--max-concurrent-invocations", min=1, help="K: jobs per replica at once."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="CPU threads per replica."),
    dtype: str = typer.Option("auto", "--dtype"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """A burst of jobs on an async endpoint at zero replicas: wake-up time, queue latency, jobs/s."""
    from twinserve.bench.async_bench import AsyncBenchConfig, run_async_bench

    cfg = AsyncBenchConfig.model_validate(
        {
            "model": str(_model_or_default(model)),
            "jobs": jobs,
            "max_new_tokens": max_new_tokens,
            "max_replicas": max_replicas,
            "max_concurrent_invocations": max_concurrent_invocations,
            "threads": threads,
            "dtype": dtype,
        }
    )
    with err.status("benchmarking …") as status:
        report = run_async_bench(cfg, progress=lambda msg: status.update(f"benchmarking: {msg} …"))
    if as_json:
        out.print_json(report.model_dump_json())
        return
    table = Table(title=f"{jobs} async chat jobs × {max_new_tokens} new tokens, autoscale 0..{max_replicas}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("succeeded / failed", f"{report.succeeded} / {report.failed}"),
        ("all submits answered (202)", f"{report.submit_seconds:.2f} s"),
        ("time to first replica from zero", f"{report.time_to_first_replica_s:.1f} s"),
        ("queue wait p50 / p99", f"{report.queue_wait_p50_s:.1f} / {report.queue_wait_p99_s:.1f} s"),
        ("latency p50 / p99 (submit → done)", f"{report.latency_p50_s:.1f} / {report.latency_p99_s:.1f} s"),
        ("jobs/s (whole burst)", f"{report.jobs_per_s:.2f}"),
        ("jobs/s (once a replica serves)", f"{report.jobs_per_s_serving:.2f}"),
        ("peak replicas", str(report.peak_replicas)),
        (
            f"baseline: sync /invocations, {report.baseline_concurrency} in flight "
            f"on {report.baseline_replicas} replica(s)",
            f"{report.baseline_requests_per_s:.2f} req/s",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print(f"async (serving) ÷ sync baseline: {report.ratio:.2f}x")
    for event in report.scaling_events:
        out.print(f"  scaling: {event}", highlight=False, soft_wrap=True)


@app.command("chaos")
def chaos_command(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model folder (default: the default model)."
    ),
    runs: int = typer.Option(30, "--runs", min=1, help="Operations, each cut by one kill -9."),
    seed: int = typer.Option(0, "--seed", help="The same seed draws the same operations and kills."),
    heal_timeout: float = typer.Option(
        120.0, "--heal-timeout", min=1, help="Seconds a run may take to heal."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """kill -9 the CLI, the controller, the router or a replica during create/update/scale/delete;
    no command after it: the endpoint must heal by itself (InService or fully gone)."""
    from twinserve.bench.chaos_bench import ChaosConfig, run_chaos

    cfg = ChaosConfig(
        model=str(_model_or_default(model).resolve()), runs=runs, seed=seed, heal_timeout_s=heal_timeout
    )
    with err.status("chaos …") as status:

        def progress(message: str) -> None:
            err.print(f"[dim]{message}[/dim]", highlight=False)
            status.update(message)

        report = run_chaos(cfg, progress=progress)
    if as_json:
        out.print_json(report.model_dump_json())
    else:
        table = Table(title=f"{runs} operations, one kill -9 each")
        for column in ("run", "operation", "killed", "after", "healed", "in", "violations"):
            table.add_column(column, justify="right" if column in ("run", "after", "in") else "left")
        for r in report.runs:
            table.add_row(
                str(r.index + 1),
                r.operation,
                r.killed or "nothing",
                f"{r.kill_after_s:.1f} s",
                r.outcome or "NO",
                "" if r.heal_s is None else f"{r.heal_s:.1f} s",
                "; ".join(r.violations),
            )
        out.print(table)
        kills = ", ".join(f"{k} {n}" for k, n in sorted(report.kills_by_target.items()))
        p50 = "-" if report.heal_s_p50 is None else f"{report.heal_s_p50:.1f}"
        worst = "-" if report.heal_s_max is None else f"{report.heal_s_max:.1f}"
        out.print(
            f"kills: {kills}; heal time p50 {p50} s, max {worst} s; invariant violations {report.violations}"
        )
    if report.violations:
        raise typer.Exit(1)


def _model_or_default(model: Path | None) -> Path:
    if model is not None:
        return model
    from twinserve.registry.default_model import ensure_default_model

    return ensure_default_model()


def _summary(title: str, rows: list[tuple[str, str, str, bool | None]]) -> Table:
    """A report's (measure, value, goal, met) rows, marked meets/misses where there is a goal."""
    summary = Table(title=title)
    for column in ("measure", "value", "goal", ""):
        summary.add_column(column)
    for measure, value, goal, met in rows:
        mark = "" if met is None else ("[green]meets[/green]" if met else "[red]misses[/red]")
        summary.add_row(measure, value, goal, mark)
    return summary
