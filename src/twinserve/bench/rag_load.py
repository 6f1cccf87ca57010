"""`bench rag`'s load: the questions, the `/rag` and direct clients, the `rag serve` process.

Both clients record whole (non-streamed) answers, timed from send to the last byte, and a
failure is a result (the direct client does not retry; the RAG service retries as it always does).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

from twinserve.client import HttpTransport, LLMClient
from twinserve.errors import TwinserveError
from twinserve.server.process import ServerProcess, free_port, tail_lines

if TYPE_CHECKING:
    from twinserve.bench.rag_bench import RagBenchConfig

_RAG_SERVE = [sys.executable, "-c", "from twinserve.cli.rag import app; app()", "serve"]
# questions the project's docs answer; cycled by the load
QUESTIONS = [
    "How do I create an async endpoint that scales to zero?",
    "How do I roll back an update of an endpoint?",
    "What does twinserve bench serve measure?",
    "How do I import a model into the registry?",
    "How do I run a batch transform job on a JSONL file?",
    "What is the SageMaker runtime gateway for?",
    "How does the planner choose a deployment?",
    "How do I set an autoscaling policy on an endpoint?",
]


@dataclass(frozen=True)
class Outcome:
    """One request: seconds it took, what it cost; `error` when it failed."""

    seconds: float
    retrieval_ms: float | None = None
    prompt_ms: float | None = None
    llm_ms: float | None = None
    completion_tokens: int | None = None
    error: str | None = None


# ------------------------------------------------------------------ processes
class RagServeProcess(ServerProcess):
    """`twinserve rag serve ARGS` on a free 127.0.0.1 port; waits, stops and kills as ServerProcess.
    (Its own command line: ServerProcess starts `twinserve serve`, with flags `rag serve` lacks.)"""

    def __init__(self, args: list[str], *, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [*_RAG_SERVE, "--host", "127.0.0.1", "--port", str(self.port), "--log-format", "text", *args]
        out: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
        out.close()

    def log_tail(self, lines: int = 10) -> str:
        # the readiness probes log a line each: the reason a start failed is above them
        assert self.log_path is not None
        tail = tail_lines(self.log_path, lines, keep=lambda line: "/health" not in line)
        return tail.rstrip("\n") or "(no log)"


# ------------------------------------------------------------------ load
def _rag_body(cfg: RagBenchConfig, query: str, *, return_prompt: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "query": query,
        "k": cfg.k,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": 0,
    }
    if return_prompt:
        body["return_prompt"] = True
    return body


async def fetch_prompts(url: str, cfg: RagBenchConfig) -> list[list[dict[str, str]]]:
    """Each question's messages as the service sends them (one at a time: this is the warm-up)."""
    prompts = []
    async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout_s) as client:
        for query in QUESTIONS:
            response = await client.post("/rag", json=_rag_body(cfg, query, return_prompt=True))
            if response.status_code != 200:
                raise TwinserveError(f"/rag answered {response.status_code}: {response.text[:500]}")
            prompts.append(response.json()["prompt"])
    return prompts


def split(n: int, rounds: int) -> list[range]:
    """Request indices 0..n-1 in `rounds` consecutive parts (the first ones one longer), none empty."""
    parts, start = [], 0
    for r in range(min(rounds, n)):
        size = n // rounds + (r < n % rounds)
        parts.append(range(start, start + size))
        start += size
    return parts


async def _gather(
    indices: range, concurrency: int, one: Callable[[int], Awaitable[Outcome]]
) -> tuple[list[Outcome], float]:
    gate = asyncio.Semaphore(concurrency)

    async def send(i: int) -> Outcome:
        async with gate:
            return await one(i)

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(send(i) for i in indices))
    return list(outcomes), time.perf_counter() - started


async def rag_load(url: str, cfg: RagBenchConfig, indices: range) -> tuple[list[Outcome], float]:
    """/rag calls, `concurrency` in flight, request i asking QUESTIONS[i % len]."""
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=cfg.request_timeout_s, limits=limits) as client:

        async def one(i: int) -> Outcome:
            started = time.perf_counter()
            try:
                response = await client.post("/rag", json=_rag_body(cfg, QUESTIONS[i % len(QUESTIONS)]))
            except httpx.HTTPError as exc:
                return Outcome(time.perf_counter() - started, error=type(exc).__name__)
            seconds = time.perf_counter() - started
            if response.status_code != 200:
                error = ""
                if _is_json(response):
                    data = response.json()
                    # a 424 says what the LLM answered: "424 llm_failed/timeout", not just "424 llm_failed"
                    upstream = (data.get("llm") or {}).get("error_type")
                    error = f"{data.get('error_type', '')}{'/' + upstream if upstream else ''}"
                return Outcome(seconds, error=f"{response.status_code} {error}".strip())
            body = response.json()
            timings = body["timings"]
            return Outcome(
                seconds,
                retrieval_ms=timings["retrieval_ms"],
                prompt_ms=timings.get("prompt_ms"),
                llm_ms=timings.get("llm_ms"),
                completion_tokens=body["usage"].get("completion_tokens"),
            )

        return await _gather(indices, cfg.concurrency, one)


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("application/json")


async def direct_load(
    llm_url: str, prompts: Sequence[list[dict[str, str]]], cfg: RagBenchConfig, indices: range
) -> tuple[list[Outcome], float]:
    """Request i's messages (QUESTIONS[i % len]'s prompt) straight to the LLM; no retries: a
    failure is a result."""
    transport = HttpTransport(
        llm_url, timeout=cfg.request_timeout_s, max_keepalive_connections=cfg.concurrency
    )
    client = LLMClient(transport=transport, max_retries=0)
    try:

        async def one(i: int) -> Outcome:
            started = time.perf_counter()
            try:
                result = await client.achat(
                    prompts[i % len(prompts)], max_new_tokens=cfg.max_new_tokens, temperature=0.0
                )
            except TwinserveError as exc:
                return Outcome(time.perf_counter() - started, error=f"{exc.status_code} {exc.error_type}")
            return Outcome(time.perf_counter() - started, completion_tokens=result.generated_tokens)

        return await _gather(indices, cfg.concurrency, one)
    finally:
        await client.aclose()
