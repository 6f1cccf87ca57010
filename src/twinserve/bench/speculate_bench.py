"""`twinserve bench speculate`: one stream (W1) with prompt-lookup speculation and without it,
on the same engine in one process, request by request in turn so a shared machine's drift
hits both sides.

Two workloads, greedy:
- **copy**: chat prompts that hand the model a passage and ask it to repeat, quote or correct
  it: the answer copies its prompt, which is what prompt lookup drafts from;
- **chat**: the built-in short questions, where little of the answer is in the prompt: what
  speculation costs when its drafts are mostly wrong.

One engine serves both sides (a second engine would add a second OpenMP pool and slow both,
see docs/engine.md): between requests the runner's draft length is set on the engine thread
(`speculate` for one side, 0 for the other), and the prefix cache is off so that the side
running a prompt second does not find its prefill cached. Reported per workload: tokens/s of each side and
their ratio, TTFT, the acceptance rate, and whether every answer was the same token for token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from twinserve.bench.prompts import chat_messages
from twinserve.config import MAX_SPECULATE, Dtype, EngineConfig, Quantize
from twinserve.engine.async_engine import AsyncEngine
from twinserve.engine.chat import render_chat
from twinserve.engine.request import GenerateRequest, SamplingParams

Progress = Callable[[str], None]

PASSAGES = [
    "Continuous batching lets a server add new requests to a running batch at every decode step, "
    "instead of waiting for the slowest request of a static batch to finish. Each step, finished "
    "requests leave and waiting ones join, so the accelerator stays busy and short answers are "
    "not held back by long ones.",
    "A model registry keeps every version of a model with its metrics, its lineage and the prompt "
    "template it was trained with. Aliases such as champion point at one version, so a deployment "
    "names the alias and a promotion moves it, while the endpoint keeps the version it pinned.",
    "The prefix cache keeps the key and value tensors of finished requests. When a later prompt "
    "starts with the same tokens, those positions are copied into its slot and only the rest of "
    "the prompt is computed, which makes multi-turn chat and shared system prompts cheaper.",
]
ASKS = [
    "Repeat the passage above word for word.",
    "Quote the passage above exactly, then stop.",
    "Copy the passage above, fixing nothing.",
]


def copy_messages(n: int) -> list[list[dict[str, str]]]:
    """n conversations that ask for a given passage back (the copy-heavy workload)."""
    return [
        [{"role": "user", "content": f"{PASSAGES[i % len(PASSAGES)]}\n\n{ASKS[i % len(ASKS)]}"}]
        for i in range(n)
    ]


class SpeculateBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: Dtype = "auto"
    quantize: Quantize | None = None
    threads: int = Field(2, ge=1)
    speculate: int = Field(5, ge=1, le=MAX_SPECULATE)
    requests: int = Field(3, ge=1, description="Requests per workload and side, one at a time.")
    max_new_tokens: int = Field(128, ge=2)


class SideResult(BaseModel):
    tokens: int
    seconds: float
    ttft_ms_p50: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class WorkloadComparison(BaseModel):
    workload: str
    speculating: SideResult
    plain: SideResult
    draft_tokens: int
    accepted_tokens: int
    answers_differing: int

    @property
    def ratio(self) -> float:
        return self.speculating.tokens_per_s / self.plain.tokens_per_s if self.plain.tokens_per_s else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class SpeculateBenchReport(BaseModel):
    config: SpeculateBenchConfig
    dtype: str
    workloads: list[WorkloadComparison]


def run_speculate_bench(
    cfg: SpeculateBenchConfig, progress: Progress = lambda _: None
) -> SpeculateBenchReport:
    progress("loading the engine")
    engine = AsyncEngine.launch(
        EngineConfig(
            model=cfg.model,
            dtype=cfg.dtype,
            quantize=cfg.quantize,
            num_threads=cfg.threads,
            speculate=cfg.speculate,
            # off: the side that runs a prompt second would find its prefill cached
            prefix_cache=False,
        )
    )
    try:
        tokenizer = engine.engine.tokenizer
        workloads = {"copy": copy_messages(cfg.requests), "chat": chat_messages(cfg.requests)}
        results = []
        for name, conversations in workloads.items():
            progress(f"{name}: speculating and plain, request by request")
            prompts = [render_chat(tokenizer, m) for m in conversations]
            results.append(_compare(engine, cfg, name, prompts))
        loaded = engine.engine.loaded
        dtype = str(loaded.dtype).removeprefix("torch.") if loaded is not None else cfg.dtype
        return SpeculateBenchReport(config=cfg, dtype=dtype, workloads=results)
    finally:
        engine.shutdown()


def _compare(
    engine: AsyncEngine, cfg: SpeculateBenchConfig, name: str, prompts: list[str]
) -> WorkloadComparison:
    runner = engine.engine.runner
    stats = engine.engine.speculation
    assert stats is not None

    def set_drafts(n: int) -> None:
        engine.call(lambda: setattr(runner, "speculate", n))

    sides: dict[bool, list[tuple[list[int], float, float]]] = {True: [], False: []}
    drafted = accepted = 0
    for prompt in prompts:
        for speculating in (True, False):
            set_drafts(cfg.speculate if speculating else 0)
            before = (stats.draft_tokens, stats.accepted_tokens)
            sides[speculating].append(_one(engine, prompt, cfg.max_new_tokens))
            if speculating:
                drafted += stats.draft_tokens - before[0]
                accepted += stats.accepted_tokens - before[1]
    set_drafts(cfg.speculate)

    def side(runs: list[tuple[list[int], float, float]]) -> SideResult:
        ttfts = sorted(r[2] for r in runs)
        return SideResult(
            tokens=sum(len(r[0]) for r in runs),
            seconds=sum(r[1] for r in runs),
            ttft_ms_p50=1000 * ttfts[len(ttfts) // 2],
        )

    return WorkloadComparison(
        workload=name,
        speculating=side(sides[True]),
        plain=side(sides[False]),
        draft_tokens=drafted,
        accepted_tokens=accepted,
        answers_differing=sum(a[0] != b[0] for a, b in zip(sides[True], sides[False], strict=True)),
    )


def _one(engine: AsyncEngine, prompt: str, max_new: int) -> tuple[list[int], float, float]:
    """Token ids, seconds and TTFT of one greedy request."""
    request = GenerateRequest(
        prompt=prompt, params=SamplingParams(max_new_tokens=max_new), add_special_tokens=False
    )

    async def main() -> tuple[list[int], float, float]:
        start = time.perf_counter()
        first: float | None = None
        ids: list[int] = []
        async for event in engine.generate(request):
            if event.token is not None:
                first = first if first is not None else time.perf_counter() - start
                ids.append(event.token.id)
        return ids, time.perf_counter() - start, first or 0.0

    return asyncio.run(main())
