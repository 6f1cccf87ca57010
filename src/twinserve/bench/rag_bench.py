"""`twinserve bench rag`: what the RAG service adds to an LLM call, as microservices and as a monolith.

One run, in a temporary folder, every process on 127.0.0.1 and stopped when the run ends
(errors, Ctrl-C and SIGTERM included):
1. ingest: the project's `docs/` into a fresh Qdrant local folder, in this process — chunks/s
   over the whole ingest (read, chunk, embed, write), the model load excluded (goal ≥ 200).
2. microservices: an LLM microservice (`twinserve serve --model M`, or `--llm URL`) and
   `twinserve rag serve --llm URL` on that folder. Each bench question is asked once with
   `return_prompt: true` (unmeasured: it warms both services and yields the exact messages
   the service sends); then `requests` `/rag` calls at `concurrency` in flight, cycling the
   questions, and the same requests' messages straight to the LLM's `/v1/chat/completions`
   through `LLMClient` at the same concurrency — same `max_new_tokens`, temperature 0, so
   both sides ask the LLM for the very same generations. The two sides take turns in
   `rounds` parts (A B, B A, …), so the drift of a shared machine hits both alike.
3. monolith: that service is stopped (and the LLM, when the bench started it, so the monolith
   has the cores to itself) and `twinserve rag serve --model M` runs the same `/rag` load.
The overhead ratio is (/rag p50 − the service's reported retrieval_ms p50) ÷ direct p50: what
the service costs beyond the retrieval it reports (goal ≤ 1.10).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from twinserve.bench.interrupts import sigterm_interrupts
from twinserve.bench.rag_load import (
    Outcome,
    RagServeProcess,
    direct_load,
    fetch_prompts,
    rag_load,
    split,
)
from twinserve.bench.stats import Distribution, percentile
from twinserve.errors import TwinserveError
from twinserve.server.process import ServerProcess

Progress = Callable[[str], None]

BENCH_COLLECTION = "bench"
OVERHEAD_GOAL = 1.10
INGEST_GOAL = 200.0


class RagBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    docs: Path = Field(description="The folder ingested (the project's docs/).")
    model: str = Field("default", description="The model the LLM microservice and the monolith serve.")
    llm_url: str | None = Field(None, description="A running LLM microservice instead of starting one.")
    requests: int = Field(64, ge=1, description="/rag requests per mode (and direct requests).")
    concurrency: int = Field(32, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    k: int = Field(4, ge=1, le=50)
    rounds: int = Field(2, ge=1, description="/rag and direct alternate in this many parts (A B, B A, …).")
    monolith: bool = Field(True, description="Also measure `rag serve --model` (in-process engine).")
    start_timeout_s: float = Field(300.0, gt=0, description="Per server: loading included.")
    request_timeout_s: float = Field(600.0, gt=0)


class IngestResult(BaseModel):
    files: int
    chunks: int
    seconds: float
    chunks_per_s: float
    embeddings_per_s: float


class ModeResult(BaseModel):
    """One side's load: client-side latency of whole (non-streamed) answers."""

    name: str
    completed: int
    failed: int
    errors: dict[str, int] = Field(default_factory=dict, description='Failures by "status error_type".')
    seconds: float
    latency_ms: Distribution | None
    retrieval_ms_p50: float | None = Field(None, description="The service's own timings.retrieval_ms.")
    prompt_ms_p50: float | None = Field(None, description="timings.prompt_ms: counting tokens at the LLM.")
    llm_ms_p50: float | None = Field(None, description="timings.llm_ms: the answer's LLM call.")
    completion_tokens: int = 0

    def service_p50s(self) -> tuple[float | None, float | None, float | None]:
        return self.retrieval_ms_p50, self.prompt_ms_p50, self.llm_ms_p50


class RagBenchReport(BaseModel):
    config: RagBenchConfig
    cpu_count: int | None
    ingest: IngestResult
    microservices: ModeResult
    direct: ModeResult
    monolith: ModeResult | None = None
    overhead_ratio: float | None = Field(
        description="(/rag p50 − retrieval p50) ÷ direct p50, microservices."
    )
    monolith_overhead_ratio: float | None = Field(description="The same with the monolith's /rag.")
    errors: dict[str, str] = Field(default_factory=dict, description="A part that failed (the monolith).")

    def rows(self) -> list[tuple[str, ...]]:
        """(mode, completed/failed, p50, p90, then the service's retrieval, prompt and LLM p50s)
        for the table, in milliseconds."""
        rows = []
        for mode in (self.microservices, self.direct, self.monolith):
            if mode is None:
                continue
            lat = mode.latency_ms
            rows.append(
                (
                    mode.name,
                    f"{mode.completed}/{mode.failed}",
                    "-" if lat is None else f"{lat.p50:.0f}",
                    "-" if lat is None else f"{lat.p90:.0f}",
                    *("-" if v is None else f"{v:.0f}" for v in mode.service_p50s()),
                )
            )
        return rows

    def goals(self) -> list[tuple[str, str, str, bool | None]]:
        """(measure, value, goal, met) rows; `met` None where a number is missing."""
        ratio, mono = self.overhead_ratio, self.monolith_overhead_ratio
        return [
            (
                "overhead ratio, microservices",
                "-" if ratio is None else f"{ratio:.3f}",
                f"≤ {OVERHEAD_GOAL}",
                None if ratio is None else ratio <= OVERHEAD_GOAL,
            ),
            ("overhead ratio, monolith", "-" if mono is None else f"{mono:.3f}", "", None),
            (
                "ingest chunks/s",
                f"{self.ingest.chunks_per_s:.0f} ({self.ingest.chunks} chunks, {self.ingest.seconds:.1f} s)",
                f"≥ {INGEST_GOAL:.0f}",
                self.ingest.chunks_per_s >= INGEST_GOAL,
            ),
        ]


# ------------------------------------------------------------------ the maths
def overhead_ratio(rag: ModeResult, direct: ModeResult) -> float | None:
    """(rag p50 − its retrieval p50) ÷ direct p50; None when a side has no successful request."""
    if rag.latency_ms is None or direct.latency_ms is None or not direct.latency_ms.p50:
        return None
    return (rag.latency_ms.p50 - (rag.retrieval_ms_p50 or 0.0)) / direct.latency_ms.p50


def mode_result(name: str, outcomes: Sequence[Outcome], seconds: float) -> ModeResult:
    ok = [o for o in outcomes if o.error is None]

    def p50(values: Sequence[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return percentile(present, 50) if present else None

    return ModeResult(
        name=name,
        completed=len(ok),
        failed=len(outcomes) - len(ok),
        errors=dict(Counter(o.error for o in outcomes if o.error is not None)),
        seconds=seconds,
        latency_ms=Distribution.of([o.seconds for o in ok]),
        retrieval_ms_p50=p50([o.retrieval_ms for o in ok]),
        prompt_ms_p50=p50([o.prompt_ms for o in ok]),
        llm_ms_p50=p50([o.llm_ms for o in ok]),
        completion_tokens=sum(o.completion_tokens or 0 for o in ok),
    )


# ------------------------------------------------------------------ the run
def ingest_docs(docs: Path, qdrant: Path) -> IngestResult:
    from twinserve.rag.embed import load_embedder
    from twinserve.rag.ingest import Ingestor
    from twinserve.rag.settings import RagSettings
    from twinserve.rag.store import VectorStore

    settings = RagSettings(qdrant_path=qdrant, collection=BENCH_COLLECTION)
    embedder = load_embedder(settings.embedding_model_path(), settings.embed_batch_size)
    store = VectorStore(settings)  # closed before the service opens the same folder
    try:
        report = Ingestor(settings, embedder, store).ingest([docs], collection=BENCH_COLLECTION)
    finally:
        store.close()
    if not report.chunks:
        raise TwinserveError(f"{docs}: nothing to ingest")
    return IngestResult(
        files=report.files,
        chunks=report.chunks,
        seconds=report.seconds,
        chunks_per_s=report.chunks / report.seconds if report.seconds > 0 else 0.0,
        embeddings_per_s=report.embeddings_per_s,
    )


def run_rag_bench(cfg: RagBenchConfig, progress: Progress = lambda _: None) -> RagBenchReport:
    with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="twinserve-bench-rag-") as tmp:
        folder = Path(tmp)
        env = {"TWINSERVE_RAG_QDRANT_PATH": str(folder / "qdrant")}
        progress(f"ingesting {cfg.docs}")
        ingest = ingest_docs(cfg.docs, folder / "qdrant")
        with contextlib.ExitStack() as stack:
            llm_url = cfg.llm_url
            llm: ServerProcess | None = None
            if llm_url is None:
                progress(f"starting the LLM microservice ({cfg.model})")
                llm = stack.enter_context(
                    ServerProcess(["--model", cfg.model, "--log-format", "text"], log_path=folder / "llm.log")
                )
                llm.wait_healthy(cfg.start_timeout_s)
                llm_url = llm.url
            progress("starting the RAG service (microservices)")
            args = ["--llm", llm_url, "--collection", BENCH_COLLECTION]
            with RagServeProcess(args, env=env, log_path=folder / "rag-micro.log") as rag:
                rag.wait_healthy(cfg.start_timeout_s)
                progress("fetching the prompts (warm-up)")
                prompts = asyncio.run(fetch_prompts(rag.url, cfg))
                micro, direct = _interleaved(cfg, rag.url, llm_url, prompts, progress)
        errors: dict[str, str] = {}
        monolith = None
        if cfg.monolith:
            try:
                monolith = _monolith(cfg, env, folder, progress)
            except TwinserveError as exc:  # what was measured so far is still worth reporting
                errors["monolith"] = exc.message
    return RagBenchReport(
        config=cfg,
        cpu_count=os.cpu_count(),
        ingest=ingest,
        microservices=micro,
        direct=direct,
        monolith=monolith,
        overhead_ratio=overhead_ratio(micro, direct),
        monolith_overhead_ratio=None if monolith is None else overhead_ratio(monolith, direct),
        errors=errors,
    )


def _monolith(cfg: RagBenchConfig, env: dict[str, str], folder: Path, progress: Progress) -> ModeResult:
    progress(f"starting the RAG service (monolith, {cfg.model} in-process)")
    args = ["--model", cfg.model, "--collection", BENCH_COLLECTION]
    with RagServeProcess(args, env=env, log_path=folder / "rag-mono.log") as rag:
        rag.wait_healthy(cfg.start_timeout_s)
        progress("monolith: warm-up")
        asyncio.run(fetch_prompts(rag.url, cfg))
        progress(f"monolith: {cfg.requests} /rag requests, {cfg.concurrency} in flight")
        return mode_result("monolith /rag", *asyncio.run(rag_load(rag.url, cfg, range(cfg.requests))))


def _interleaved(
    cfg: RagBenchConfig,
    rag_url: str,
    llm_url: str,
    prompts: Sequence[list[dict[str, str]]],
    progress: Progress,
) -> tuple[ModeResult, ModeResult]:
    """/rag and direct in alternating order per round (A B, B A, …): drift of a shared machine
    hits both sides alike."""
    done: dict[str, tuple[list[Outcome], float]] = {"rag": ([], 0.0), "direct": ([], 0.0)}
    for r, part in enumerate(split(cfg.requests, cfg.rounds)):
        for side in ("rag", "direct") if r % 2 == 0 else ("direct", "rag"):
            progress(f"round {r + 1}: {len(part)} {side} requests, {cfg.concurrency} in flight")
            load = rag_load(rag_url, cfg, part) if side == "rag" else direct_load(llm_url, prompts, cfg, part)
            outcomes, seconds = asyncio.run(load)
            done[side] = (done[side][0] + outcomes, done[side][1] + seconds)
    return mode_result("micro /rag", *done["rag"]), mode_result("direct LLM", *done["direct"])
