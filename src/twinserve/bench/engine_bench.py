"""`twinserve bench engine`: the engine and HF `generate` on the same prompts, in one process.

Machines here are noisy, so absolute numbers are only indicative; the report's
ratios (engine ÷ baseline, measured minutes apart in the same process) are what to
compare. Workloads:
- W32: `concurrency` chat requests submitted at once, `max_new_tokens` each, greedy.
  Baseline: one static left-padded `generate` batch of the same prompts.
- W1: the same requests one at a time (tokens/s including prefill, as `generate` counts).
- TTFT: a `ttft_prompt_tokens`-token prompt, time to the first token; baseline: one
  forward pass of transformers over that prompt (its prefill).
With `peer="llama-cpp"`, llama.cpp runs W1 and TTFT too, on the same token ids, in turn with
the others (`bench/llama_cpp_peer.py`). The engine runs with its prefix cache off: the
workloads repeat prompts, and a cache hit would time a prefill that was skipped
(`twinserve bench prefix` measures the cache).
Peak RSS is sampled while the engine runs W32 alone, before the baseline model is loaded.
Then the two run in turn (engine W32 is run again after the baseline's, and W1/TTFT
alternate request by request), so that slow drift of a shared machine hits both sides.
The baseline runs on the engine's thread (`AsyncEngine.call`), as the engine does: a
second thread doing torch work would make both sides pay OpenMP futex wake-ups.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field

from twinserve.bench.llama_cpp_peer import LlamaCppPeer
from twinserve.bench.prompts import chat_messages, long_prompt_ids
from twinserve.config import Dtype, EngineConfig, Quantize
from twinserve.engine.async_engine import AsyncEngine
from twinserve.engine.chat import render_chat
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
    peer: Literal["llama-cpp"] | None = Field(None, description="Also run this peer on W1 and TTFT.")
    peer_gguf: str | None = Field(None, description="The GGUF the llama.cpp peer serves.")


class WorkloadResult(BaseModel):
    name: str
    system: str
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_ms_p50: float | None = None
    itl_ms_p50: float | None = None

    @classmethod
    def measured(
        cls, name: str, system: str, requests: int, tokens: int, seconds: float, **latency: float
    ) -> WorkloadResult:
        return cls(
            name=name,
            system=system,
            requests=requests,
            output_tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens / seconds,
            **latency,
        )


class EngineBenchReport(BaseModel):
    config: EngineBenchConfig
    dtype: str
    results: list[WorkloadResult]
    ratios: dict[str, float]
    peak_rss_mb_w32: float
    ttft_ms: float
    baseline_prefill_ms: float | None
    peer_ttft_ms: float | None = None


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
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return len(stamps), stamps[0] - start, gaps


def _requests(prompts: list[str], max_new: int) -> list[GenerateRequest]:
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    return [GenerateRequest(prompt=p, params=params, add_special_tokens=False) for p in prompts]


class EngineSide:
    """The engine's half of each workload."""

    def __init__(self, engine: AsyncEngine, cfg: EngineBenchConfig) -> None:
        self.engine = engine
        self.cfg = cfg

    def batch(self, prompts: list[str]) -> tuple[int, float, list[float], list[float]]:
        async def main() -> tuple[float, list[tuple[int, float, list[float]]]]:
            start = time.perf_counter()
            runs = await asyncio.gather(
                *[_timed_stream(self.engine, r) for r in _requests(prompts, self.cfg.max_new_tokens)]
            )
            return time.perf_counter() - start, runs

        wall, runs = asyncio.run(main())
        return sum(r[0] for r in runs), wall, [r[1] for r in runs], [g for r in runs for g in r[2]]

    def single(self, prompt: str) -> tuple[int, float, float, list[float]]:
        start = time.perf_counter()
        n, ttft, gaps = asyncio.run(
            _timed_stream(self.engine, _requests([prompt], self.cfg.max_new_tokens)[0])
        )
        return n, time.perf_counter() - start, ttft, gaps

    def ttft(self, ids: list[int]) -> float:
        request = GenerateRequest(prompt_token_ids=ids, params=SamplingParams(max_new_tokens=1))
        return asyncio.run(_timed_stream(self.engine, request))[1]


class _BaselineSide:
    """transformers `generate` with static left-padded batches, the same prompts.

    Build and use it only through `AsyncEngine.call` (see the module docstring).
    """

    def __init__(self, cfg: EngineBenchConfig, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(cfg.model)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).eval()
        self.gen = {
            "max_new_tokens": cfg.max_new_tokens,
            "min_new_tokens": cfg.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.tok.pad_token_id,
        }
        self._generate(["warm up"], max_new_tokens=2, min_new_tokens=2)

    def _generate(self, prompts: list[str], **overrides: Any) -> tuple[int, float]:
        batch = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(**batch, **{**self.gen, **overrides})
            wall = time.perf_counter() - start
        return (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0], wall

    def batch(self, prompts: list[str]) -> tuple[int, float]:
        return self._generate(prompts)

    def single(self, prompt: str) -> tuple[int, float]:
        return self._generate([prompt])

    def prefill(self, ids: list[int]) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            self.model(torch.tensor([ids]), use_cache=True)
            return time.perf_counter() - start


def _ms(seconds: list[float]) -> float:
    return 1000 * statistics.median(seconds)


def run_engine_bench(cfg: EngineBenchConfig, progress: Progress = lambda _: None) -> EngineBenchReport:
    """Engine first alone (its peak RSS), then engine and baseline interleaved so drift hits both."""
    torch.set_num_threads(cfg.threads)
    progress("loading the engine")
    engine_cfg = EngineConfig(
        model=cfg.model,
        dtype=cfg.dtype,
        quantize=cfg.quantize,
        num_threads=cfg.threads,
        max_batch_size=max(64, cfg.concurrency),
        max_concurrent_requests=max(128, cfg.concurrency),
        prefix_cache=False,  # the workloads repeat prompts (see the module docstring)
    )
    async_engine = AsyncEngine.launch(engine_cfg)
    try:
        return _measure(cfg, EngineSide(async_engine, cfg), progress)
    finally:
        async_engine.shutdown()


def _measure(cfg: EngineBenchConfig, eng: EngineSide, progress: Progress) -> EngineBenchReport:
    on_engine = eng.engine.call
    tokenizer = eng.engine.engine.tokenizer
    loaded = eng.engine.engine.loaded
    dtype = loaded.dtype if loaded is not None else torch.float32
    prompts = [render_chat(tokenizer, m) for m in chat_messages(cfg.concurrency)]
    singles = prompts[: cfg.w1_requests]
    long_ids = long_prompt_ids(tokenizer, cfg.ttft_prompt_tokens)
    name = f"W{cfg.concurrency}"

    progress(f"engine {name} (alone, for peak RSS)")
    with _RssSampler() as rss:
        runs = [eng.batch(prompts)]
    base: _BaselineSide | None = None
    if cfg.baseline:
        progress("loading transformers")
        # int8 has no transformers twin here; the baseline computes in the engine's activation dtype
        base_dtype = torch.float32 if cfg.quantize == "int8" else dtype
        base = on_engine(partial(_BaselineSide, cfg, base_dtype))
        progress(f"transformers {name}")
        base_batch = on_engine(partial(base.batch, prompts))
        progress(f"engine {name} (again, after the baseline)")
        runs.append(eng.batch(prompts))
    tokens = sum(r[0] for r in runs)
    wall = sum(r[1] for r in runs)
    w32 = WorkloadResult.measured(
        name,
        "twinserve",
        len(prompts) * len(runs),
        tokens,
        wall,
        ttft_ms_p50=_ms([t for r in runs for t in r[2]]),
        itl_ms_p50=_ms([g for r in runs for g in r[3]]),
    )
    peer: LlamaCppPeer | None = None
    if cfg.peer is not None:
        progress("loading llama.cpp")
        assert cfg.peer_gguf is not None
        context = max(cfg.ttft_prompt_tokens, *(len(tokenizer(p)["input_ids"]) for p in singles))
        peer = on_engine(
            partial(
                LlamaCppPeer,
                Path(cfg.peer_gguf),
                threads=cfg.threads,
                context_tokens=context + cfg.max_new_tokens + 16,
            )
        )
    progress("W1, engine, transformers and peer in turn")
    e1, b1, p1 = [], [], []
    for p in singles:
        e1.append(eng.single(p))
        if base is not None:
            b1.append(on_engine(partial(base.single, p)))
        if peer is not None:
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            p1.append(on_engine(partial(peer.single, ids, cfg.max_new_tokens)))
    w1 = WorkloadResult.measured(
        "W1",
        "twinserve",
        len(e1),
        sum(r[0] for r in e1),
        sum(r[1] for r in e1),
        ttft_ms_p50=_ms([r[2] for r in e1]),
        itl_ms_p50=_ms([g for r in e1 for g in r[3]]),
    )
    progress(f"TTFT of a {cfg.ttft_prompt_tokens}-token prompt")
    ttfts, prefills, peer_ttfts = [], [], []
    for _ in range(3):
        ttfts.append(eng.ttft(long_ids))
        if base is not None:
            prefills.append(on_engine(partial(base.prefill, long_ids)))
        if peer is not None:
            peer_ttfts.append(on_engine(partial(peer.single, long_ids, 1))[2])
    results = [w32, w1]
    ratios: dict[str, float] = {}
    if peer is not None:
        pw1 = WorkloadResult.measured(
            "W1",
            peer.description,
            len(p1),
            sum(r[0] for r in p1),
            sum(r[1] for r in p1),
            ttft_ms_p50=_ms([r[2] for r in p1]),
        )
        results.append(pw1)
        ratios["W1_vs_peer"] = w1.tokens_per_s / pw1.tokens_per_s
        ratios["ttft_vs_peer"] = _ms(ttfts) / _ms(peer_ttfts)
    if base is not None:
        bw32 = WorkloadResult.measured(name, "hf-generate", len(prompts), base_batch[0], base_batch[1])
        bw1 = WorkloadResult.measured(
            "W1", "hf-generate", len(b1), sum(r[0] for r in b1), sum(r[1] for r in b1)
        )
        results += [bw32, bw1]
        ratios = {
            f"{name}_throughput": w32.tokens_per_s / bw32.tokens_per_s,
            "W1_tokens_per_s": w1.tokens_per_s / bw1.tokens_per_s,
            "ttft_vs_prefill": _ms(ttfts) / _ms(prefills),
            **ratios,
        }
    return EngineBenchReport(
        config=cfg,
        dtype=str(dtype).removeprefix("torch."),
        results=results,
        ratios=ratios,
        peak_rss_mb_w32=rss.peak / 2**20,
        ttft_ms=_ms(ttfts),
        baseline_prefill_ms=_ms(prefills) if prefills else None,
        peer_ttft_ms=_ms(peer_ttfts) if peer_ttfts else None,
    )
