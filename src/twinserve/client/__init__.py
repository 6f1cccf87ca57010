"""The LLM client: `LLMClient` over a pluggable `Transport` (HTTP, or SageMaker Runtime).

Depends on nothing of twinserve but `errors` and the wire schemas in `server.protocol`,
so an app that only calls an endpoint never imports the engine or torch. `SageMakerTransport`
is imported on first use, so boto3 (the `[aws]` extra) is only needed by those who use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinserve.client.async_jobs import AsyncInvocation, AsyncState, AsyncStatus
from twinserve.client.llm_client import LLMClient
from twinserve.client.transport import (
    AsyncRef,
    AsyncRequest,
    AsyncStreamResponse,
    HttpTransport,
    Response,
    StreamResponse,
    Transport,
)
from twinserve.client.types import Api, FinishReason, GenerationResult, StreamChunk, TokenInfo

__all__ = [
    "Api",
    "AsyncInvocation",
    "AsyncRef",
    "AsyncRequest",
    "AsyncState",
    "AsyncStatus",
    "AsyncStreamResponse",
    "FinishReason",
    "GenerationResult",
    "HttpTransport",
    "LLMClient",
    "Response",
    "SageMakerTransport",
    "StreamChunk",
    "StreamResponse",
    "TokenInfo",
    "Transport",
]

if TYPE_CHECKING:
    from twinserve.client.sagemaker_transport import SageMakerTransport


def __getattr__(name: str) -> Any:
    if name == "SageMakerTransport":
        from twinserve.client.sagemaker_transport import SageMakerTransport

        return SageMakerTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
