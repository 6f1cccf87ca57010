"""`RagService`: retrieve, build the prompt, ask the LLM, answer with the sources used.

Everything the LLM does (rephrasing, counting tokens, answering) goes through one
`LLMClient`; its failures become `LLMFailedError` (424) carrying what the LLM said, so a
caller tells "the LLM is down" from "my request is wrong" (422) and "the vector store is
down" (503). The model's name, version and limits come from its `/info`, re-read every few
seconds so an endpoint updated to a new model version is noticed without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from twinserve.client import LLMClient, StreamChunk
from twinserve.errors import LLMFailedError, TwinserveError
from twinserve.rag.metrics import RagMetrics
from twinserve.rag.prompt import BuiltPrompt, ModelLimits, PromptBuilder
from twinserve.rag.retrieve import EXPAND_SYSTEM, Retrieval, Retriever, parse_rephrasings
from twinserve.rag.schemas import (
    ModelRef,
    RagRequest,
    RagResponse,
    SearchRequest,
    SearchResponse,
    Source,
    Timings,
    Usage,
)
from twinserve.rag.store import Hit
from twinserve.rag.upstream import llm_call

log = logging.getLogger(__name__)

INFO_TTL_S = 10.0


def _source(hit: Hit) -> Source:
    return Source(
        id=hit.id,
        source=hit.source,
        title=hit.title,
        score=round(hit.score, 6),
        text=hit.text,
        position=hit.position,
        metadata=hit.metadata,
    )


def _limits(max_input: int | None, max_total: int | None) -> ModelLimits:
    """The LLM's limits; one it does not report is derived from the other (TGI's defaults
    relation), and a server that reports neither is not one we can fit prompts to."""
    if max_total is None and max_input is None:
        raise LLMFailedError(
            "the LLM's /info reports neither max_total_tokens nor max_input_tokens",
            {"status": 200, "error_type": "no_limits", "message": "no limits in /info"},
        )
    if max_total is None:
        assert max_input is not None
        max_total = max_input + 1
    return ModelLimits(max_input if max_input is not None else max_total - 1, max_total)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


@dataclass
class _Prepared:
    """What an answer needs before the LLM is called."""

    started: float
    timings: Timings
    model: ModelRef
    retrieval: Retrieval
    prompt: BuiltPrompt

    @property
    def sources(self) -> list[Source]:
        return [_source(h) for h in self.prompt.used]

    def usage(self, prompt_tokens: int | None, completion_tokens: int | None) -> Usage:
        prompt = prompt_tokens if prompt_tokens is not None else self.prompt.prompt_tokens
        total = prompt + completion_tokens if completion_tokens is not None else None
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion_tokens,
            total_tokens=total,
            context_chunks=len(self.prompt.used),
            dropped_chunks=self.prompt.dropped,
            truncated_chunks=self.prompt.truncated,
        )


class RagService:
    def __init__(self, retriever: Retriever, llm: LLMClient, metrics: RagMetrics | None = None) -> None:
        self.retriever = retriever
        self.llm = llm
        self.metrics = metrics or RagMetrics()
        self.prompts = PromptBuilder(llm, self.metrics)
        self._info: tuple[float, ModelRef, ModelLimits] | None = None
        self._info_lock = asyncio.Lock()
        if retriever.expander is None:
            retriever.expander = self._rephrase

    # ------------------------------------------------------------ the model
    async def model(self) -> tuple[ModelRef, ModelLimits]:
        """The served model and its limits, from `/info` at most every INFO_TTL_S seconds."""
        cached = self._info
        if cached is not None and time.monotonic() - cached[0] < INFO_TTL_S:
            return cached[1], cached[2]
        async with self._info_lock:
            if self._info is not None and time.monotonic() - self._info[0] < INFO_TTL_S:
                return self._info[1], self._info[2]
            info = await llm_call(self.llm.ainfo(), self.metrics)
            version = info.registry_version
            ref = ModelRef(
                name=info.registry_name or info.model_id, version=None if version is None else str(version)
            )
            limits = _limits(info.max_input_tokens, info.max_total_tokens)
            self._info = (time.monotonic(), ref, limits)
            return ref, limits

    async def _rephrase(self, query: str, n: int) -> list[str]:
        messages = [
            {"role": "system", "content": EXPAND_SYSTEM.format(n=n)},
            {"role": "user", "content": query},
        ]
        result = await llm_call(
            self.llm.achat(messages, max_new_tokens=min(48 * n, 512), temperature=0.0), self.metrics
        )
        return parse_rephrasings(result.text, query, n)

    # ------------------------------------------------------------ retrieval
    async def search(self, request: SearchRequest) -> SearchResponse:
        started = time.perf_counter()
        timings = Timings()
        retrieval = await self._retrieve(request, timings)
        timings.total_ms = _ms(started)
        return SearchResponse(
            sources=[_source(h) for h in retrieval.hits], queries=retrieval.queries, timings=timings
        )

    async def _retrieve(self, request: SearchRequest, timings: Timings) -> Retrieval:
        retrieval = await self.retriever.retrieve(
            request.query,
            request.k,
            timings,
            filters=request.filters,
            expand=request.expand,
            rerank=request.rerank,
        )
        self.metrics.retrieval_seconds.observe(timings.retrieval_ms / 1000)
        return retrieval

    # ------------------------------------------------------------ answers
    async def _prepare(self, request: RagRequest) -> _Prepared:
        started = time.perf_counter()
        timings = Timings()
        (model, limits), retrieval = await asyncio.gather(self.model(), self._retrieve(request, timings))
        t = time.perf_counter()
        prompt = await self.prompts.build(request.query, retrieval.hits, request.max_new_tokens, limits)
        timings.prompt_ms = _ms(t)
        self.metrics.context_chunks.observe(len(prompt.used))
        self.metrics.dropped_chunks.inc(prompt.dropped)
        return _Prepared(started, timings, model, retrieval, prompt)

    def _params(self, request: RagRequest) -> dict[str, Any]:
        return {"max_new_tokens": request.max_new_tokens, "temperature": request.temperature}

    async def answer(self, request: RagRequest, request_id: str | None = None) -> RagResponse:
        prepared = await self._prepare(request)
        t = time.perf_counter()
        result = await llm_call(
            self.llm.achat(prepared.prompt.messages, **self._params(request)), self.metrics
        )
        prepared.timings.llm_ms = _ms(t)
        self.metrics.llm_seconds.observe(prepared.timings.llm_ms / 1000)
        prepared.timings.total_ms = _ms(prepared.started)
        return RagResponse(
            answer=result.text,
            sources=prepared.sources,
            model=prepared.model,
            usage=prepared.usage(result.prompt_tokens, result.generated_tokens),
            timings=prepared.timings,
            finish_reason=result.finish_reason.value if result.finish_reason else None,
            request_id=request_id,
            prompt=prepared.prompt.messages if request.return_prompt else None,
        )

    async def open_stream(self, request: RagRequest, request_id: str | None = None) -> RagStream:
        """Retrieve, build the prompt and start the LLM's stream up to its first token, so that
        every failure before the first byte still gets its own status code."""
        prepared = await self._prepare(request)
        t = time.perf_counter()
        chunks = self.llm.achat_stream(prepared.prompt.messages, **self._params(request))
        try:
            first = await llm_call(anext(chunks), self.metrics)
        except BaseException:
            await chunks.aclose()
            raise
        return RagStream(self, request, request_id, prepared, chunks, first, t)

    # ------------------------------------------------------------ health
    async def health(self) -> dict[str, dict[str, Any]]:
        """Each dependency's state: {"vector_store": {"ok": …}, "llm": {"ok": …}}, checked at once."""

        async def store() -> dict[str, Any]:
            try:
                count = await asyncio.to_thread(self.retriever.store.count, self.retriever.collection)
            except TwinserveError as exc:
                return {"ok": False, "reason": exc.message}
            return {"ok": True, "collection": self.retriever.collection, "chunks": count}

        async def llm() -> dict[str, Any]:
            try:
                await self.llm.ahealth()
            except TwinserveError as exc:
                return {"ok": False, "reason": exc.message}
            return {"ok": True}

        vector_store, model = await asyncio.gather(store(), llm())
        return {"vector_store": vector_store, "llm": model}


class RagStream:
    """An answer being streamed: `events()` yields (event, data) for SSE — the sources first, then
    each token, then `done` with usage and timings (or `error` when the LLM fails mid-answer)."""

    def __init__(
        self,
        service: RagService,
        request: RagRequest,
        request_id: str | None,
        prepared: _Prepared,
        chunks: AsyncIterator[StreamChunk],
        first: StreamChunk,
        llm_started: float,
    ) -> None:
        self._service = service
        self._request = request
        self._request_id = request_id
        self._prepared = prepared
        self._chunks = chunks
        self._first = first
        self._llm_started = llm_started

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        prepared = self._prepared
        head: dict[str, Any] = {
            "sources": [s.model_dump() for s in prepared.sources],
            "model": prepared.model.model_dump(),
            "request_id": self._request_id,
        }
        if self._request.return_prompt:
            head["prompt"] = prepared.prompt.messages
        yield "sources", head
        last = self._first
        async with aclosing(self._chunks) as chunks:  # type: ignore[type-var]
            if last.text:
                yield "token", {"text": last.text}
            try:
                while not last.finished:
                    last = await anext(chunks)
                    if last.text:
                        yield "token", {"text": last.text}
            except StopAsyncIteration:
                pass
            except TwinserveError as exc:
                failed = LLMFailedError.of(exc)
                self._service.metrics.llm_failures.labels(exc.error_type).inc()
                log.warning("LLM failed mid-stream", extra={"request_id": self._request_id})
                yield (
                    "error",
                    {"error": failed.message, "error_type": failed.error_type, "llm": failed.upstream},
                )
                return
        prepared.timings.llm_ms = _ms(self._llm_started)
        self._service.metrics.llm_seconds.observe(prepared.timings.llm_ms / 1000)
        prepared.timings.total_ms = _ms(prepared.started)
        yield (
            "done",
            {
                "usage": prepared.usage(last.prompt_tokens, last.generated_tokens).model_dump(),
                "timings": prepared.timings.model_dump(),
                "finish_reason": last.finish_reason.value if last.finish_reason else None,
            },
        )

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
