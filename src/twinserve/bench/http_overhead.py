"""What HTTP costs: the same W32 workload in-process and through `twinserve serve`, interleaved.

The in-process side is the engine bench's W32 (AsyncEngine in this process); the HTTP side
is `bench serve` streaming the same conversations through the OpenAI chat route of a
server child process with the same thread budget. Rounds alternate which side goes first,
so the machine's drift hits both; the report gives each round's ratio and their median.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from twinserve.bench.engine_bench import EngineBenchConfig, EngineSide
from twinserve.bench.prompts import chat_messages
from twinserve.bench.serve_bench import ServeBenchConfig, chat_workload, serve_bench
from twinserve.config import Dtype, EngineConfig
from twinserve.engine.async_engine import AsyncEngine
from twinserve.engine.chat import render_chat
from twinserve.server.process import ServerProcess

Progress = Callable[[str], None]


class HttpOverheadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: Dtype = "auto"
    threads: int = Field(2, ge=1, description="Torch threads, in-process and in the server alike.")
    concurrency: int = Field(32, ge=1)
    max_new_tokens: int = Field(128, ge=2)
    rounds: int = Field(2, ge=1)


class SideResult(BaseModel):
    tokens_per_s: float
    ttft_ms_p50: float


class OverheadRound(BaseModel):
    in_process: SideResult
    http: SideResult

    @property
    def ratio(self) -> float:
        return self.http.tokens_per_s / self.in_process.tokens_per_s


class HttpOverheadReport(BaseModel):
    config: HttpOverheadConfig
    rounds: list[OverheadRound]
    throughput_ratio_median: float = Field(description="HTTP ÷ in-process output tokens/s, median of rounds.")
    http_ttft_ms_p50: float = Field(description="Median over rounds of the HTTP side's p50 TTFT.")
    in_process_ttft_ms_p50: float


def run_http_overhead_bench(
    cfg: HttpOverheadConfig, progress: Progress = lambda _: None
) -> HttpOverheadReport:
    conversations = chat_messages(cfg.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        progress("starting the server")
        server = ServerProcess(
            [
                "--model",
                cfg.model,
                "--dtype",
                cfg.dtype,
                "--threads",
                str(cfg.threads),
                "--log-format",
                "text",
            ],
            log_path=Path(tmp) / "serve.log",
        )
        with server:
            server.wait_healthy()
            progress("loading the in-process engine")
            engine = AsyncEngine.launch(
                EngineConfig(model=cfg.model, dtype=cfg.dtype, num_threads=cfg.threads)
            )
            try:
                bench_cfg = EngineBenchConfig(
                    model=cfg.model,
                    dtype=cfg.dtype,
                    threads=cfg.threads,
                    concurrency=cfg.concurrency,
                    max_new_tokens=cfg.max_new_tokens,
                    baseline=False,
                )
                side = EngineSide(engine, bench_cfg)
                prompts = [render_chat(engine.engine.tokenizer, m) for m in conversations]
                http_cfg = chat_workload(
                    server.url, conversations, Path(tmp), max_new_tokens=cfg.max_new_tokens
                )
                rounds = [_round(i, side, prompts, http_cfg, progress) for i in range(cfg.rounds)]
            finally:
                engine.shutdown()
    return HttpOverheadReport(
        config=cfg,
        rounds=rounds,
        throughput_ratio_median=statistics.median(r.ratio for r in rounds),
        http_ttft_ms_p50=statistics.median(r.http.ttft_ms_p50 for r in rounds),
        in_process_ttft_ms_p50=statistics.median(r.in_process.ttft_ms_p50 for r in rounds),
    )


def _round(
    i: int, side: EngineSide, prompts: list[str], http_cfg: ServeBenchConfig, progress: Progress
) -> OverheadRound:
    def in_process() -> SideResult:
        progress(f"round {i + 1}: in-process")
        tokens, wall, ttfts, _ = side.batch(prompts)
        return SideResult(tokens_per_s=tokens / wall, ttft_ms_p50=1000 * statistics.median(ttfts))

    def http() -> SideResult:
        progress(f"round {i + 1}: HTTP")
        report = serve_bench(http_cfg)
        if report.failed or report.ttft_ms is None:
            raise RuntimeError(f"HTTP run failed: {report.errors} {report.error_messages}")
        return SideResult(tokens_per_s=report.output_token_throughput, ttft_ms_p50=report.ttft_ms.p50)

    if i % 2 == 0:
        first = in_process()
        return OverheadRound(in_process=first, http=http())
    second = http()
    return OverheadRound(in_process=in_process(), http=second)
