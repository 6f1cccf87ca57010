"""The LLM client: `LLMClient` over a pluggable `Transport` (HTTP now, SageMaker runtime next).

Depends on nothing of twinserve but `errors` and the wire schemas in `server.protocol`,
so an app that only calls an endpoint never imports the engine or torch.
"""

from __future__ import annotations

from twinserve.client.llm_client import LLMClient
from twinserve.client.transport import AsyncStreamResponse, HttpTransport, Response, StreamResponse, Transport
from twinserve.client.types import Api, FinishReason, GenerationResult, StreamChunk, TokenInfo

__all__ = [
    "Api",
    "AsyncStreamResponse",
    "FinishReason",
    "GenerationResult",
    "HttpTransport",
    "LLMClient",
    "Response",
    "StreamChunk",
    "StreamResponse",
    "TokenInfo",
    "Transport",
]
