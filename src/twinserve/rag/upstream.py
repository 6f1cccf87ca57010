"""Every call to the LLM goes through `llm_call`: a failure, whatever it is (down, overloaded,
a 422 from its limits), becomes an `LLMFailedError` (424) carrying what the LLM said, so the
service's own 422s (the caller's request is wrong) never mix with the LLM's."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from twinserve.errors import LLMFailedError, TwinserveError
from twinserve.rag.metrics import RagMetrics

T = TypeVar("T")


async def llm_call(awaitable: Awaitable[T], metrics: RagMetrics | None = None) -> T:
    try:
        return await awaitable
    except TwinserveError as exc:
        if metrics is not None:
            metrics.llm_failures.labels(exc.error_type).inc()
        raise LLMFailedError.of(exc) from exc
