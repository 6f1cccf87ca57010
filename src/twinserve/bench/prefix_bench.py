"""`twinserve bench prefix`: the cross-request prefix cache, on and off, side by side in one run.

Two `twinserve serve` children of the same model, dtype and thread budget, one with the prefix
cache (`--prefix-cache`) and one without (`--no-prefix-cache`), get the same workloads through
the OpenAI chat route (streaming, greedy, `stream_options.include_usage`). They never run at
the same time: a wave goes to one server, then the same wave to the other, and the side that
goes first alternates per round, so the machine's drift hits both.

- chat: `conversations` conversations × `turns` turns. Every turn re-sends the whole history
  (system prompt, the earlier user turns and *that server's own* earlier answers, the new user
  message); one round is one turn of every conversation at once. TTFT p50/p90 per side and
  their ratio (goal: with ≤ ⅓ of without).
- shared: `shared_requests` requests whose user message is one ~`context_tokens` passage and a
  different question each, sent in several arrangements (all at once; waves of `wave_size`, so
  later waves can reuse what earlier ones left; one request first, then the rest). Each
  arrangement has a passage of its own, so no arrangement profits from an earlier one. Prefill
  tokens computed = prompt tokens − cached tokens (OpenAI `usage`), as a share of the prompt
  tokens sent (goal ≤ 25%), TTFT p50 and total time per side.

Hits are also read from each server's `/metrics` (`prefix_cache_*`, differences over each
measured wave). Greedy outputs of the two servers are compared request by request.
Counted as "computed" is what the prefix cache did not serve: prompt tokens that the engine's
in-batch prefix sharing (`share_prompt_prefix`) computes once for many rows of one prefill
pass count once per row here, on both sides, as `usage` does not report them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, computed_field

from twinserve.bench.interrupts import sigterm_interrupts
from twinserve.bench.prompts import (
    CHAT_SYSTEM_PROMPT,
    FOLLOW_UPS,
    PASSAGE,
    QUESTIONS,
    SHARED_SYSTEM_PROMPT,
)
from twinserve.bench.stats import Distribution, percentile
from twinserve.config import Dtype
from twinserve.server.process import ServerProcess

Progress = Callable[[str], None]
Part = Literal["chat", "shared"]
PARTS: tuple[Part, ...] = ("chat", "shared")
SideName = Literal["cache", "no-cache"]
SIDES: tuple[SideName, SideName] = ("cache", "no-cache")
Messages = list[dict[str, str]]

CHAT_TTFT_GOAL = 1 / 3  # multi-turn TTFT p50: with the cache ≤ ⅓ of without
SHARED_COMPUTED_GOAL = 0.25  # shared context: prefill tokens computed ≤ 25% of those sent
_METRICS = re.compile(r"^(prefix_cache_(?:queries|queried_tokens|hit_tokens)_total)\s+(\S+)$", re.M)


def _quiet(_: str) -> None:
    """The default progress callback: say nothing."""


class PrefixBenchConfig(BaseModel):
    """One `bench prefix` run."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Registry reference or model folder both servers serve.")
    dtype: Dtype = Field("auto", description="Both servers' dtype; auto = bf16 where fast, as `serve`.")
    threads: int = Field(2, ge=1, description="CPU threads of each server (they never run at once).")
    parts: list[Part] = Field(default_factory=lambda: list(PARTS), min_length=1, description="Parts to run.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens per answer at most (greedy, EOS stops).")
    conversations: int = Field(8, ge=1, description="Chat: conversations, each turn of all at once.")
    turns: int = Field(6, ge=1, description="Chat: turns per conversation.")
    shared_requests: int = Field(32, ge=1, description="Shared: requests per arrangement.")
    wave_size: int = Field(8, ge=1, description="Shared: requests per wave in the waves arrangement.")
    context_tokens: int = Field(600, ge=16, description="Shared: tokens of the shared passage (about).")
    system_prompt: str = Field(CHAT_SYSTEM_PROMPT, description="Chat: every conversation's system message.")
    warmup: bool = Field(True, description="One unmeasured wave of short, unrelated chats per server first.")
    timeout_s: float = Field(600.0, gt=0, description="Seconds without a byte before a request fails.")


# ------------------------------------------------------------------ results
class CacheCounters(BaseModel):
    """Differences of a server's `prefix_cache_*_total` counters over a measured span."""

    queries: int = 0
    queried_tokens: int = 0
    hit_tokens: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def hit_rate(self) -> float:
        """Hit tokens ÷ queried tokens (0 with no query)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def __add__(self, other: CacheCounters) -> CacheCounters:
        return CacheCounters(
            queries=self.queries + other.queries,
            queried_tokens=self.queried_tokens + other.queried_tokens,
            hit_tokens=self.hit_tokens + other.hit_tokens,
        )

    def __sub__(self, other: CacheCounters) -> CacheCounters:
        return CacheCounters(
            queries=self.queries - other.queries,
            queried_tokens=self.queried_tokens - other.queried_tokens,
            hit_tokens=self.hit_tokens - other.hit_tokens,
        )


class SideStats(BaseModel):
    """One server's measured requests of a workload; times in milliseconds unless named `_s`."""

    requests: int
    seconds: float = Field(description="Wall time of the measured waves (sent one after another).")
    ttft_ms: Distribution
    e2e_ms: Distribution
    prompt_tokens: int = Field(description="Prompt tokens sent (usage.prompt_tokens).")
    cached_tokens: int = Field(description="Of those, served by the prefix cache (cached_tokens).")
    completion_tokens: int
    metrics: CacheCounters = Field(description="The server's own prefix-cache counters over the span.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def computed_tokens(self) -> int:
        """Prompt tokens prefilled (not served by the prefix cache)."""
        return self.prompt_tokens - self.cached_tokens

    @computed_field  # type: ignore[prop-decorator]
    @property
    def computed_share(self) -> float:
        """Computed ÷ sent prompt tokens."""
        return self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 1.0


class ChatTurn(BaseModel):
    turn: int = Field(description="1-based.")
    first: SideName = Field(description="The side measured first in this round.")
    cache: SideStats
    no_cache: SideStats


class ChatResult(BaseModel):
    turns: list[ChatTurn]
    cache: SideStats = Field(description="Every turn of every conversation, with the prefix cache.")
    no_cache: SideStats
    ttft_p50_ratio: float = Field(description="TTFT p50 with the cache ÷ without (goal ≤ ⅓).")
    ttft_p90_ratio: float
    later_turns_ttft_p50_ratio: float | None = Field(
        description="The same p50 ratio over turns 2.. only (turn 1 has nothing to reuse); None with 1 turn."
    )
    compared: int = Field(description="Requests whose messages were the same on both servers.")
    mismatches: int = Field(description="Of those, answers that differ between the two servers.")
    diverged: int = Field(
        description="Requests not compared: an earlier answer of their conversation differed, so the "
        "histories they re-send differ."
    )
    goal: float = CHAT_TTFT_GOAL


class SharedArrangement(BaseModel):
    name: str
    waves: list[int] = Field(description="Requests per wave; a wave starts when the previous one ended.")
    first: SideName
    context_tokens: int = Field(description="Tokens of this arrangement's passage (server tokenizer).")
    cache: SideStats
    no_cache: SideStats
    mismatches: int = Field(description="Answers that differ between the two servers.")
    goal: float = SHARED_COMPUTED_GOAL


class PrefixBenchReport(BaseModel):
    config: PrefixBenchConfig
    cpu_count: int | None
    chat: ChatResult | None = None
    shared: list[SharedArrangement] = Field(default_factory=list)
    requests_compared: int = Field(0, description="Requests sent with the same messages to both servers.")
    mismatches: int = Field(0, description="Of those, greedy answers that differ (should be 0).")
    mismatches_with_hit: int = Field(
        0,
        description="Of the mismatches, those where the cached side reused a prefix (the others differ "
        "without any help of the cache: batch composition, in bf16).",
    )
    mismatch_examples: list[str] = Field(
        default_factory=list, description="The first few requests whose outputs differ, from where they part."
    )

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
        """(measure, value, goal, met) rows for a table; `met` None where there is no goal."""
        rows: list[tuple[str, str, str, bool | None]] = []
        if (c := self.chat) is not None:
            p50 = f"{c.ttft_p50_ratio:.2f} ({c.cache.ttft_ms.p50:.0f} / {c.no_cache.ttft_ms.p50:.0f} ms)"
            rows.append(("chat: TTFT p50, cache ÷ none", p50, "≤ 0.33", c.ttft_p50_ratio <= c.goal))
            p90 = f"{c.ttft_p90_ratio:.2f} ({c.cache.ttft_ms.p90:.0f} / {c.no_cache.ttft_ms.p90:.0f} ms)"
            rows.append(("chat: TTFT p90, cache ÷ none", p90, "", None))
            if c.later_turns_ttft_p50_ratio is not None:
                rows.append(
                    (
                        "chat: TTFT p50 of turns 2.., cache ÷ none",
                        f"{c.later_turns_ttft_p50_ratio:.2f}",
                        "",
                        None,
                    )
                )
            rows.append(("chat: hit rate (/metrics)", f"{c.cache.metrics.hit_rate:.0%}", "", None))
            rows.append(("chat: prefill computed", _share(c.cache), "", None))
        for a in self.shared:
            met = a.cache.computed_share <= a.goal
            rows.append((f"shared, {a.name}: prefill computed", _share(a.cache), "≤ 25%", met))
        mismatch = f"{self.mismatches} of {self.requests_compared} ({self.mismatches_with_hit} with a hit)"
        rows.append(("outputs differing, cache vs none", mismatch, "0", self.mismatches == 0))
        if self.chat is not None and self.chat.diverged:
            rows.append(("  chat turns after a difference (not compared)", str(self.chat.diverged), "", None))
        return rows


def _share(stats: SideStats) -> str:
    return f"{stats.computed_share:.0%} ({stats.computed_tokens} of {stats.prompt_tokens} tok)"


# ------------------------------------------------------------------ one request
@dataclass(frozen=True)
class Answer:
    """One streamed chat request; times in seconds from its start."""

    key: str
    text: str
    ttft: float
    latency: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class _Side:
    name: SideName
    server: ServerProcess
    client: httpx.AsyncClient


async def chat_once(client: httpx.AsyncClient, key: str, messages: Messages, max_new_tokens: int) -> Answer:
    """Stream one greedy chat completion; TTFT is the first chunk with text (or the last chunk)."""
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            detail = (await r.aread()).decode(errors="replace")[:300]
            raise RuntimeError(f"{key}: HTTP {r.status_code}: {detail}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # keep-alive comments
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{key}: error event: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content or choice.get("finish_reason"):
                    ttft = time.perf_counter() - start if ttft is None else ttft
                    parts.append(content or "")
    latency = time.perf_counter() - start
    if usage is None or ttft is None:
        raise RuntimeError(f"{key}: the stream ended without {'usage' if ttft else 'a token'}")
    details = usage.get("prompt_tokens_details") or {}
    return Answer(
        key=key,
        text="".join(parts),
        ttft=ttft,
        latency=latency,
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=int(details.get("cached_tokens") or 0),
        completion_tokens=int(usage["completion_tokens"]),
    )


async def cache_counters(client: httpx.AsyncClient) -> CacheCounters:
    """The server's `prefix_cache_*_total` counters now."""
    r = await client.get("/metrics")
    r.raise_for_status()
    values = {name: int(float(value)) for name, value in _METRICS.findall(r.text)}
    return CacheCounters(
        queries=values.get("prefix_cache_queries_total", 0),
        queried_tokens=values.get("prefix_cache_queried_tokens_total", 0),
        hit_tokens=values.get("prefix_cache_hit_tokens_total", 0),
    )


async def _measure(
    side: _Side, waves: Sequence[Sequence[tuple[str, Messages]]], max_new_tokens: int
) -> tuple[list[Answer], float, CacheCounters]:
    """Send each wave at once, the next when it is done; answers, wall seconds, counter deltas."""
    before = await cache_counters(side.client)
    answers: list[Answer] = []
    started = time.perf_counter()
    for wave in waves:
        answers += await asyncio.gather(
            *(chat_once(side.client, key, messages, max_new_tokens) for key, messages in wave)
        )
    seconds = time.perf_counter() - started
    return answers, seconds, await cache_counters(side.client) - before


def side_stats(answers: Sequence[Answer], seconds: float, metrics: CacheCounters) -> SideStats:
    ttft, e2e = Distribution.of([a.ttft for a in answers]), Distribution.of([a.latency for a in answers])
    assert ttft is not None and e2e is not None, "a measured span has requests"
    return SideStats(
        requests=len(answers),
        seconds=seconds,
        ttft_ms=ttft,
        e2e_ms=e2e,
        prompt_tokens=sum(a.prompt_tokens for a in answers),
        cached_tokens=sum(a.cached_tokens for a in answers),
        completion_tokens=sum(a.completion_tokens for a in answers),
        metrics=metrics,
    )


def _order(i: int, sides: dict[SideName, _Side]) -> list[_Side]:
    return [sides[n] for n in (SIDES if i % 2 == 0 else SIDES[::-1])]


class _Mismatches:
    """Compares the two servers' answers to the same messages, by request key."""

    def __init__(self) -> None:
        self.compared = self.differing = self.with_hit = 0
        self.examples: list[str] = []

    def count(self, by_side: dict[SideName, list[Answer]], keys: set[str] | None = None) -> int:
        """Differing answers among `keys` (default: all); adds them to the run's totals."""
        other = {a.key: a.text for a in by_side["no-cache"]}
        mine = [a for a in by_side["cache"] if keys is None or a.key in keys]
        differing = [a for a in mine if other.get(a.key) != a.text]
        self.compared += len(mine)
        self.differing += len(differing)
        self.with_hit += sum(a.cached_tokens > 0 for a in differing)
        for a in differing[: max(0, 5 - len(self.examples))]:
            b = other.get(a.key, "")
            k = len(os.path.commonprefix([a.text, b]))
            self.examples.append(
                f"{a.key} (cached {a.cached_tokens} tok): after {k} equal chars, "
                f"{a.text[k : k + 40]!r} vs {b[k : k + 40]!r}"
            )
        return len(differing)


# ------------------------------------------------------------------ part 1: multi-turn chat
def user_turn(conversation: int, turn: int) -> str:
    """Turn 0 asks a question of its own; later turns follow it up."""
    if turn == 0:
        return QUESTIONS[conversation % len(QUESTIONS)]
    return FOLLOW_UPS[(conversation + turn - 1) % len(FOLLOW_UPS)]


async def chat_part(
    cfg: PrefixBenchConfig, sides: dict[SideName, _Side], mismatches: _Mismatches, progress: Progress
) -> ChatResult:
    system = {"role": "system", "content": cfg.system_prompt}
    histories: dict[SideName, list[Messages]] = {
        n: [[system] for _ in range(cfg.conversations)] for n in SIDES
    }
    every: dict[SideName, list[Answer]] = {n: [] for n in SIDES}
    totals = {n: (0.0, CacheCounters()) for n in SIDES}
    turns: list[ChatTurn] = []
    differing = compared = 0
    for t in range(cfg.turns):
        stats: dict[SideName, SideStats] = {}
        answered: dict[SideName, list[Answer]] = {}
        order = _order(t, sides)
        same = {
            f"chat c{c} t{t + 1}" for c, h in enumerate(histories["cache"]) if h == histories["no-cache"][c]
        }
        compared += len(same)
        for side in order:
            progress(f"chat turn {t + 1}/{cfg.turns}: {side.name}")
            history = histories[side.name]
            for c, messages in enumerate(history):
                messages.append({"role": "user", "content": user_turn(c, t)})
            wave = [(f"chat c{c} t{t + 1}", messages) for c, messages in enumerate(history)]
            answers, seconds, counters = await _measure(side, [wave], cfg.max_new_tokens)
            for messages, answer in zip(history, answers, strict=True):
                messages.append({"role": "assistant", "content": answer.text})
            stats[side.name], answered[side.name] = side_stats(answers, seconds, counters), answers
            every[side.name] += answers
            seconds_so_far, counters_so_far = totals[side.name]
            totals[side.name] = (seconds_so_far + seconds, counters_so_far + counters)
        differing += mismatches.count(answered, same)
        turns.append(
            ChatTurn(turn=t + 1, first=order[0].name, cache=stats["cache"], no_cache=stats["no-cache"])
        )
    cache, no_cache = (side_stats(every[n], *totals[n]) for n in SIDES)
    later = {n: [a.ttft for a in every[n][cfg.conversations :]] for n in SIDES}  # answers in turn order
    return ChatResult(
        turns=turns,
        cache=cache,
        no_cache=no_cache,
        ttft_p50_ratio=cache.ttft_ms.p50 / no_cache.ttft_ms.p50,
        ttft_p90_ratio=cache.ttft_ms.p90 / no_cache.ttft_ms.p90,
        later_turns_ttft_p50_ratio=percentile(later["cache"], 50) / percentile(later["no-cache"], 50)
        if cfg.turns > 1
        else None,
        compared=compared,
        mismatches=differing,
        diverged=cfg.conversations * cfg.turns - compared,
    )


# ------------------------------------------------------------------ part 2: shared context
def arrangements(cfg: PrefixBenchConfig) -> list[tuple[str, list[int]]]:
    """(name, requests per wave): all at once, waves of `wave_size`, one first then the rest."""
    n, size = cfg.shared_requests, cfg.wave_size
    waves = [min(size, n - i) for i in range(0, n, size)]
    result = [(f"{n} at once", [n]), (f"waves of {size}", waves)]
    if n > 1:
        result.append((f"1 then {n - 1}", [1, n - 1]))
    return result


async def passage(client: httpx.AsyncClient, variant: int, tokens: int) -> tuple[str, int]:
    """About `tokens` tokens of the built-in passage (cut after a whole word), starting at
    paragraph `variant` and cycling, and its length in the server's tokens (`/tokenize`, which
    refuses text past the server's input limit: paragraphs are added one at a time)."""
    text = f"Document {variant + 1}."
    k = variant
    while len(cut := await _tokenize(client, text)) <= tokens:
        text += " " + PASSAGE[k % len(PASSAGE)]
        k += 1
    stop = int(cut[tokens - 1]["stop"])
    end = len(text) if (space := text.find(" ", stop)) < 0 else space
    return text[:end], len(await _tokenize(client, text[:end]))


async def _tokenize(client: httpx.AsyncClient, text: str) -> list[dict[str, Any]]:
    r = await client.post("/tokenize", json={"inputs": text})
    if r.status_code != 200:
        raise RuntimeError(f"/tokenize answered {r.status_code}: {r.text[:300]}")
    return list(r.json())


async def shared_part(
    cfg: PrefixBenchConfig, sides: dict[SideName, _Side], mismatches: _Mismatches, progress: Progress
) -> list[SharedArrangement]:
    results = []
    for i, (name, waves) in enumerate(arrangements(cfg)):
        text, n_tokens = await passage(sides["cache"].client, i, cfg.context_tokens)
        requests: list[tuple[str, Messages]] = []
        for q in range(cfg.shared_requests):
            question = QUESTIONS[q % len(QUESTIONS)]
            user = f"{text}\n\nQuestion: {question}"
            messages = [
                {"role": "system", "content": SHARED_SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ]
            requests.append((f"shared {name} q{q}", messages))
        split, start = [], 0
        for size in waves:
            split.append(requests[start : start + size])
            start += size
        stats: dict[SideName, SideStats] = {}
        answered: dict[SideName, list[Answer]] = {}
        order = _order(i, sides)
        for side in order:
            progress(f"shared context, {name}: {side.name}")
            answers, seconds, counters = await _measure(side, split, cfg.max_new_tokens)
            stats[side.name], answered[side.name] = side_stats(answers, seconds, counters), answers
        results.append(
            SharedArrangement(
                name=name,
                waves=waves,
                first=order[0].name,
                context_tokens=n_tokens,
                cache=stats["cache"],
                no_cache=stats["no-cache"],
                mismatches=mismatches.count(answered),
            )
        )
    return results


# ------------------------------------------------------------------ the run
def _warmup_wave(n: int) -> list[tuple[str, Messages]]:
    # no system message: the template's own (unlike either workload's), so nothing here is reused
    return [
        (f"warm-up {i}", [{"role": "user", "content": QUESTIONS[-1 - i % len(QUESTIONS)]}]) for i in range(n)
    ]


async def _run(
    cfg: PrefixBenchConfig, servers: dict[SideName, ServerProcess], progress: Progress
) -> PrefixBenchReport:
    timeout = httpx.Timeout(cfg.timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with contextlib.AsyncExitStack() as stack:
        sides: dict[SideName, _Side] = {}
        for name, server in servers.items():
            client = httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits)
            sides[name] = _Side(name, server, await stack.enter_async_context(client))
        if cfg.warmup:
            for side in sides.values():
                progress(f"warm-up: {side.name}")
                await _measure(
                    side, [_warmup_wave(max(cfg.conversations, cfg.wave_size))], cfg.max_new_tokens
                )
        mismatches = _Mismatches()
        chat = await chat_part(cfg, sides, mismatches, progress) if "chat" in cfg.parts else None
        shared = await shared_part(cfg, sides, mismatches, progress) if "shared" in cfg.parts else []
    return PrefixBenchReport(
        config=cfg,
        cpu_count=os.cpu_count(),
        chat=chat,
        shared=shared,
        requests_compared=mismatches.compared,
        mismatches=mismatches.differing,
        mismatches_with_hit=mismatches.with_hit,
        mismatch_examples=mismatches.examples,
    )


@contextlib.contextmanager
def _servers(
    cfg: PrefixBenchConfig, folder: Path, progress: Progress
) -> Iterator[dict[SideName, ServerProcess]]:
    """Both servers, started together and healthy; stopped (killed on an error) when the block ends."""
    base = ["--model", cfg.model, "--dtype", cfg.dtype, "--threads", str(cfg.threads), "--log-format", "text"]
    flags: dict[SideName, str] = {"cache": "--prefix-cache", "no-cache": "--no-prefix-cache"}
    with contextlib.ExitStack() as stack:
        progress("starting both servers")
        servers = {
            name: stack.enter_context(
                ServerProcess([*base, flags[name]], log_path=folder / f"serve-{name}.log")
            )
            for name in SIDES
        }
        for server in servers.values():
            server.wait_healthy()
        yield servers


def run_prefix_bench(cfg: PrefixBenchConfig, progress: Progress = _quiet) -> PrefixBenchReport:
    """Start both servers, run the parts, stop the servers (also on an error, Ctrl-C or SIGTERM)."""
    with (
        sigterm_interrupts(),
        tempfile.TemporaryDirectory() as tmp,
        _servers(cfg, Path(tmp), progress) as servers,
    ):
        return asyncio.run(_run(cfg, servers, progress))
