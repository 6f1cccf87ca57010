"""The LLM client: `LLMClient` over a pluggable `Transport` (HTTP, or SageMaker Runtime).

Depends on nothing of twinserve but `errors` and the wire schemas in `server.protocol`,
so an app that only calls an endpoint never imports the engine or torch. `SageMakerTransport`
is imported on first use, so boto3 (the `[aws]` extra) is only needed by those who use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twinserve.client.asgi_transport import ASGIStreamTransport
from twinserve.client.async_jobs import AsyncInvocation, AsyncState, AsyncStatus
from twinserve.client.context import request_id
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
from twinserve.client.types import (
    Api,
    ChatTokens,
    FinishReason,
    GenerationResult,
    PromptToken,
    ServerInfo,
    StreamChunk,
    TokenInfo,
)

__all__ = [
    "ASGIStreamTransport",
    "Api",
    "AsyncInvocation",
    "AsyncRef",
    "AsyncRequest",
    "AsyncState",
    "AsyncStatus",
    "AsyncStreamResponse",
    "ChatTokens",
    "FinishReason",
    "GenerationResult",
    "HttpTransport",
    "LLMClient",
    "PromptToken",
    "Response",
    "SageMakerTransport",
    "ServerInfo",
    "StreamChunk",
    "StreamResponse",
    "TokenInfo",
    "Transport",
    "request_id",
]

if TYPE_CHECKING:
    from twinserve.client.sagemaker_transport import SageMakerTransport


def __getattr__(name: str) -> Any:
    if name == "SageMakerTransport":
        from twinserve.client.sagemaker_transport import SageMakerTransport

        return SageMakerTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
