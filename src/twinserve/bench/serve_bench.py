"""`twinserve bench serve`: load on a running TGI- or OpenAI-shaped endpoint, measured per chunk.

Every request streams through `LLMClient` (the same client the RAG service uses), so
the numbers include what a real caller pays: HTTP, SSE parsing, the server's queue.
Requests arrive all at once or as a Poisson process (`request_rate`), never more than
`concurrency` in flight; the first `warmup` are sent before the clock starts. The
client does not retry here: a 429 is a result to report, not to hide.
Output tokens are the server's own count (TGI `details`, OpenAI `usage`) when it gives
one, else the number of chunks.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from twinserve.bench.prompts import QUESTIONS
from twinserve.bench.stats import Distribution, Slo, itls, tpot
from twinserve.client import HttpTransport, LLMClient, StreamChunk
from twinserve.errors import TwinserveError


class ServeBenchConfig(BaseModel):
    """One benchmark run. `request_rate=inf` sends everything at once (bounded by concurrency)."""

    # JSON has no infinity: the report writes "Infinity", which reads back
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    url: str = Field(description="Base URL of the endpoint, e.g. http://127.0.0.1:3000.")
    api: Literal["tgi", "openai"] = Field("tgi", description="Wire format of `generate` requests.")
    chat: bool = Field(False, description="Send every prompt to /v1/chat/completions.")
    model: str | None = Field(None, description="`model` field of OpenAI requests.")
    concurrency: int = Field(32, ge=1, description="Requests in flight at most.")
    num_prompts: int = Field(128, ge=1, description="Measured requests.")
    max_new_tokens: int = Field(128, ge=1)
    request_rate: float = Field(math.inf, gt=0, description="Requests/s (Poisson arrivals); inf = at once.")
    prompts_file: Path | None = Field(None, description='JSONL of {"prompt": …} or {"messages": […]}.')
    ignore_eos: bool = Field(True, description="Ask for exactly max_new_tokens (vLLM's `ignore_eos`).")
    api_key: SecretStr | None = Field(None, exclude=True)
    seed: int = Field(0, description="Seeds prompt order and arrival times.")
    slo: Slo | None = Field(None, description="Objectives for goodput.")
    warmup: int = Field(0, ge=0, description="Requests sent first and left out of the results.")
    timeout: float = Field(600.0, gt=0, description="Seconds without a byte before a request fails.")


@dataclass(frozen=True)
class BenchPrompt:
    """One request's input: a raw prompt, or a conversation (always sent to chat)."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass
class RequestRecord:
    """What happened to one request; times are seconds from its start."""

    ok: bool
    latency: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    counted_by_server: bool = False
    error: str | None = None
    error_message: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None


class ServeBenchReport(BaseModel):
    """Results; latencies in milliseconds, throughputs per second of `duration_s`."""

    config: ServeBenchConfig
    completed: int
    failed: int
    errors: dict[str, int] = Field(description='Failures by "status error_type".')
    error_messages: dict[str, str] = Field(description="The first message of each kind of failure.")
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    tokens_counted_by: Literal["server", "chunks", "mixed", "none"]
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2e_ms: Distribution | None
    goodput: float | None = Field(None, description="Requests/s meeting every SLO (None without --slo).")
    good_requests: int | None = None


# ------------------------------------------------------------------ prompts
class _PromptLine(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> _PromptLine:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('each line needs exactly one of "prompt" and "messages"')
        return self


def chat_workload(
    url: str, conversations: list[list[dict[str, str]]], folder: Path, *, max_new_tokens: int
) -> ServeBenchConfig:
    """W{n}: every conversation as one streamed chat request, all at once, after one unmeasured
    request. The conversations go to `folder/prompts.jsonl` (what `--prompts-file` reads)."""
    prompts_file = folder / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    n = len(conversations)
    return ServeBenchConfig(
        url=url,
        api="openai",
        chat=True,
        concurrency=n,
        num_prompts=n,
        max_new_tokens=max_new_tokens,
        prompts_file=prompts_file,
        warmup=1,
    )


def load_prompts(path: Path | None) -> list[BenchPrompt]:
    """The JSONL file's prompts, or the built-in questions (as raw prompts)."""
    if path is None:
        return [BenchPrompt(prompt=q) for q in QUESTIONS]
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            parsed = _PromptLine.model_validate(json.loads(line))
        except ValueError as exc:  # JSON and pydantic errors both
            raise ValueError(f"{path}:{n}: {exc}") from exc
        prompts.append(BenchPrompt(prompt=parsed.prompt, messages=parsed.messages))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def workload(prompts: Sequence[BenchPrompt], n: int, rng: random.Random) -> list[BenchPrompt]:
    """n requests cycling through the prompts in a seeded order."""
    order = list(prompts)
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(n)]


# ------------------------------------------------------------------ running
async def _one(client: LLMClient, prompt: BenchPrompt, cfg: ServeBenchConfig) -> RequestRecord:
    params: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens}
    if cfg.ignore_eos:
        params["ignore_eos"] = True
    start = time.perf_counter()
    times: list[float] = []
    final: StreamChunk | None = None
    try:
        if prompt.messages is not None or cfg.chat:
            messages = prompt.messages or [{"role": "user", "content": prompt.prompt}]
            stream = client.achat_stream(messages, **params)
        else:
            stream = client.agenerate_stream(prompt.prompt or "", **params)
        async for chunk in stream:
            times.append(time.perf_counter() - start)
            if chunk.finished:
                final = chunk
    except TwinserveError as exc:
        kind = f"{exc.status_code} {exc.error_type}"
        return RequestRecord(False, time.perf_counter() - start, times, error=kind, error_message=exc.message)
    latency = time.perf_counter() - start
    counted = final is not None and final.generated_tokens is not None
    return RequestRecord(
        ok=True,
        latency=latency,
        chunk_times=times,
        output_tokens=final.generated_tokens if final and final.generated_tokens is not None else len(times),
        prompt_tokens=final.prompt_tokens if final else None,
        counted_by_server=counted,
    )


async def _run(
    client: LLMClient,
    prompts: list[BenchPrompt],
    cfg: ServeBenchConfig,
    rng: random.Random,
    on_result: Callable[[RequestRecord], None],
    paced: bool,
) -> list[RequestRecord]:
    gate = asyncio.Semaphore(cfg.concurrency)

    async def send(prompt: BenchPrompt) -> RequestRecord:
        async with gate:
            record = await _one(client, prompt, cfg)
        on_result(record)
        return record

    tasks = []
    for i, prompt in enumerate(prompts):
        if paced and i and math.isfinite(cfg.request_rate):
            await asyncio.sleep(rng.expovariate(cfg.request_rate))
        tasks.append(asyncio.create_task(send(prompt)))
    return list(await asyncio.gather(*tasks))


async def run_serve_bench(
    cfg: ServeBenchConfig, on_result: Callable[[RequestRecord], None] | None = None
) -> ServeBenchReport:
    """Warm up, run `num_prompts` requests, summarise. `on_result` sees each measured request."""
    rng = random.Random(cfg.seed)
    prompts = load_prompts(cfg.prompts_file)
    transport = HttpTransport(
        cfg.url,
        api_key=cfg.api_key.get_secret_value() if cfg.api_key else None,
        timeout=cfg.timeout,
        max_keepalive_connections=cfg.concurrency,
    )
    client = LLMClient(transport=transport, api=cfg.api, model=cfg.model, max_retries=0)
    try:
        if cfg.warmup:
            await _run(client, workload(prompts, cfg.warmup, rng), cfg, rng, lambda _: None, paced=False)
        measured = workload(prompts, cfg.num_prompts, rng)
        started = time.perf_counter()
        records = await _run(client, measured, cfg, rng, on_result or (lambda _: None), paced=True)
        duration = time.perf_counter() - started
    finally:
        await client.aclose()
    return summarize(cfg, records, duration)


def serve_bench(
    cfg: ServeBenchConfig, on_result: Callable[[RequestRecord], None] | None = None
) -> ServeBenchReport:
    """`run_serve_bench` in its own event loop."""
    return asyncio.run(run_serve_bench(cfg, on_result))


# ---------------------------------------------------------------- summary
def summarize(cfg: ServeBenchConfig, records: Sequence[RequestRecord], duration: float) -> ServeBenchReport:
    ok = [r for r in records if r.ok and r.chunk_times]
    failed = [r for r in records if not (r.ok and r.chunk_times)]
    failures = Counter(r.error or "no output" for r in failed)
    messages: dict[str, str] = {}
    for r in failed:
        messages.setdefault(r.error or "no output", r.error_message or "the stream had no chunk")
    ttfts = [r.chunk_times[0] for r in ok]
    tpots = [t for r in ok if (t := tpot(r.latency, r.chunk_times[0], r.output_tokens)) is not None]
    gaps = [gap for r in ok for gap in itls(r.chunk_times)]
    output_tokens = sum(r.output_tokens for r in ok)
    good = None
    if cfg.slo is not None:
        slo = cfg.slo
        good = sum(
            slo.met(r.chunk_times[0], tpot(r.latency, r.chunk_times[0], r.output_tokens), r.latency)
            for r in ok
        )
    per_s = 1 / duration if duration > 0 else 0.0
    return ServeBenchReport(
        config=cfg,
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(failures),
        error_messages=messages,
        duration_s=duration,
        request_throughput=len(ok) * per_s,
        output_token_throughput=output_tokens * per_s,
        total_input_tokens=sum(r.prompt_tokens or 0 for r in ok),
        total_output_tokens=output_tokens,
        tokens_counted_by=_counted_by(ok),
        ttft_ms=Distribution.of(ttfts),
        tpot_ms=Distribution.of(tpots),
        itl_ms=Distribution.of(gaps),
        e2e_ms=Distribution.of([r.latency for r in ok]),
        goodput=None if good is None else good * per_s,
        good_requests=good,
    )


def _counted_by(records: Sequence[RequestRecord]) -> Literal["server", "chunks", "mixed", "none"]:
    if not records:
        return "none"
    by_server = sum(r.counted_by_server for r in records)
    if by_server == len(records):
        return "server"
    return "chunks" if by_server == 0 else "mixed"
