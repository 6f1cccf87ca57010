"""Server-sent events: one `data:` line per event, flushed as it is produced."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "cache-control": "no-cache",
    # nginx and other proxies would otherwise buffer the stream
    "x-accel-buffering": "no",
}


def sse_event(payload: BaseModel, *, exclude_none: bool = False) -> bytes:
    return b"data: " + payload.model_dump_json(exclude_none=exclude_none).encode() + b"\n\n"


def sse_response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
