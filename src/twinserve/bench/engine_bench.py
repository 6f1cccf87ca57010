"""`twinserve bench engine`: the engine and HF `generate` on the same prompts, in one process.

Machines here are noisy, so absolute numbers are only indicative; the report's
ratios (engine ÷ baseline, measured minutes apart in the same process) are what to
compare. Workloads:
- W32: `concurrency` chat requests submitted at once, `max_new_tokens` each, greedy.
  Baseline: one static left-padded `generate` batch of the same prompts.
- W1: the same requests one at a time (tokens/s including prefill, as `generate` counts).
- TTFT: a `ttft_prompt_tokens`-token prompt, time to the first token; baseline: one
  forward pass of transformers over that prompt (its prefill).
Peak RSS is sampled while the engine runs W32, before the baseline model is loaded.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from twinserve.bench.prompts import chat_messages, long_prompt_ids
from twinserve.config import Dtype, EngineConfig, Quantize
from twinserve.engine.async_engine import AsyncEngine
from twinserve.engine.chat import render_chat
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams

Progress = Callable[[str], None]


class EngineBenchConfig(BaseModel):
    """What to measure; defaults are the issue's W1/W32 workloads on 2 threads."""

    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: Dtype = "auto"
    quantize: Quantize | None = None
    threads: int = Field(2, ge=1)
    concurrency: int = Field(32, ge=1, description="Requests of the W32 workload.")
    max_new_tokens: int = Field(128, ge=2)
    w1_requests: int = Field(3, ge=1, description="Requests run one at a time for W1.")
    ttft_prompt_tokens: int = Field(200, ge=1)
    baseline: bool = Field(True, description="Also run transformers `generate` for the ratios.")


class WorkloadResult(BaseModel):
    name: str
    system: str
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_ms_p50: float | None = None
    itl_ms_p50: float | None = None


class EngineBenchReport(BaseModel):
    config: EngineBenchConfig
    dtype: str
    results: list[WorkloadResult]
    ratios: dict[str, float]
    peak_rss_mb_w32: float
    ttft_ms: float
    baseline_prefill_ms: float | None


class _RssSampler:
    """Peak resident memory of this process while active (psutil, every 20 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


async def _timed_stream(engine: AsyncEngine, request: GenerateRequest) -> tuple[int, float, list[float]]:
    """Tokens, TTFT and inter-token gaps of one request."""
    start = time.perf_counter()
    stamps: list[float] = []
    async for event in engine.generate(request):
        if event.token is not None:
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return len(stamps), stamps[0] - start, gaps


def _requests(prompts: list[str], max_new: int) -> list[GenerateRequest]:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    return [GenerateRequest(prompt=p, params=params, add_special_tokens=False) for p in prompts]


async def _engine_workloads(
    engine: AsyncEngine, cfg: EngineBenchConfig, prompts: list[str], long_ids: list[int], progress: Progress
) -> tuple[WorkloadResult, WorkloadResult, float, float]:
    progress(f"engine W{cfg.concurrency}")
    with _RssSampler() as rss:
        start = time.perf_counter()
        results = await asyncio.gather(*[_timed_stream(engine, r) for r in _requests(prompts, cfg.max_new_tokens)])
        wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    w32 = WorkloadResult(
        name=f"W{cfg.concurrency}", system="twinserve", requests=len(results), output_tokens=tokens,
        seconds=wall, tokens_per_s=tokens / wall,
        ttft_ms_p50=1000 * statistics.median(r[1] for r in results),
        itl_ms_p50=1000 * statistics.median(g for r in results for g in r[2]),
    )
    progress("engine W1")
    w1_tokens, w1_time, ttfts, gaps = 0, 0.0, [], []
    for request in _requests(prompts[: cfg.w1_requests], cfg.max_new_tokens):
        start = time.perf_counter()
        n, ttft, g = await _timed_stream(engine, request)
        w1_time += time.perf_counter() - start
        w1_tokens += n
        ttfts.append(ttft)
        gaps += g
    w1 = WorkloadResult(
        name="W1", system="twinserve", requests=cfg.w1_requests, output_tokens=w1_tokens, seconds=w1_time,
        tokens_per_s=w1_tokens / w1_time, ttft_ms_p50=1000 * statistics.median(ttfts),
        itl_ms_p50=1000 * statistics.median(gaps),
    )
    progress(f"engine TTFT ({cfg.ttft_prompt_tokens}-token prompt)")
    samples = []
    for _ in range(3):
        request = GenerateRequest(prompt_token_ids=long_ids, params=SamplingParams(max_new_tokens=1))
        samples.append((await _timed_stream(engine, request))[1])
    return w32, w1, rss.peak / 2**20, 1000 * statistics.median(samples)


def _baseline_workloads(
    cfg: EngineBenchConfig, dtype: torch.dtype, prompts: list[str], long_ids: list[int], progress: Progress
) -> tuple[WorkloadResult, WorkloadResult, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).eval()
    gen = {"max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.max_new_tokens, "do_sample": False,
           "pad_token_id": tok.pad_token_id}
    progress(f"transformers generate, static batch of {len(prompts)}")
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**tok(prompts[:2], return_tensors="pt", padding=True, add_special_tokens=False),
                       max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        start = time.perf_counter()
        out = model.generate(**batch, **gen)
        wall = time.perf_counter() - start
    tokens = (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
    w32 = WorkloadResult(name=f"W{len(prompts)}", system="hf-generate", requests=len(prompts),
                         output_tokens=tokens, seconds=wall, tokens_per_s=tokens / wall)
    progress("transformers generate, one request at a time")
    w1_tokens, w1_time = 0, 0.0
    with torch.inference_mode():
        for p in prompts[: cfg.w1_requests]:
            ids = tok(p, return_tensors="pt", add_special_tokens=False)
            start = time.perf_counter()
            out = model.generate(**ids, **gen)
            w1_time += time.perf_counter() - start
            w1_tokens += out.shape[1] - ids.input_ids.shape[1]
    w1 = WorkloadResult(name="W1", system="hf-generate", requests=cfg.w1_requests, output_tokens=w1_tokens,
                        seconds=w1_time, tokens_per_s=w1_tokens / w1_time)
    progress("transformers prefill")
    samples = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            model(torch.tensor([long_ids]), use_cache=True)
            samples.append(time.perf_counter() - start)
    return w32, w1, 1000 * statistics.median(samples)


def run_engine_bench(cfg: EngineBenchConfig, progress: Progress = lambda _: None) -> EngineBenchReport:
    torch.set_num_threads(cfg.threads)
    progress("loading the engine")
    engine_cfg = EngineConfig(model=cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, num_threads=cfg.threads,
                              max_batch_size=max(64, cfg.concurrency),
                              max_concurrent_requests=max(128, cfg.concurrency))
    engine = AsyncEngine(build_engine(engine_cfg))
    tokenizer = engine.engine.tokenizer
    prompts = [render_chat(tokenizer, m) for m in chat_messages(cfg.concurrency)]
    long_ids = long_prompt_ids(tokenizer, cfg.ttft_prompt_tokens)
    engine.start()
    try:
        w32, w1, rss_mb, ttft = asyncio.run(_engine_workloads(engine, cfg, prompts, long_ids, progress))
    finally:
        engine.shutdown()
    dtype = engine.engine.loaded.dtype if engine.engine.loaded else torch.float32
    del engine
    gc.collect()
    results = [w32, w1]
    ratios: dict[str, float] = {}
    prefill_ms = None
    if cfg.baseline:
        # int8 has no transformers twin here; the baseline computes in the model's dtype
        base_dtype = torch.float32 if cfg.quantize == "int8" else dtype
        b32, b1, prefill_ms = _baseline_workloads(cfg, base_dtype, prompts, long_ids, progress)
        results += [b32, b1]
        ratios = {
            f"{w32.name}_throughput": w32.tokens_per_s / b32.tokens_per_s,
            "W1_tokens_per_s": w1.tokens_per_s / b1.tokens_per_s,
            "ttft_vs_prefill": ttft / prefill_ms,
        }
    return EngineBenchReport(config=cfg, dtype=str(dtype).removeprefix("torch."), results=results, ratios=ratios,
                             peak_rss_mb_w32=rss_mb, ttft_ms=ttft, baseline_prefill_ms=prefill_ms)

