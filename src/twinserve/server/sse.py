"""Server-sent events: one `data:` line per event, flushed as it is produced.

`sse_response` owns what every stream needs once the 200 is out: an error becomes the
stream's last event in the route's protocol (then `[DONE]` on OpenAI routes) and a bug
becomes a stable internal-error event (the traceback goes to the log). A stream with
nothing to send for `sse_keepalive_s` (queued behind other requests, or a slow prefill)
sends KEEPALIVE, an SSE comment, so proxies with idle timeouts (60 s on many) keep the
connection; the routes learn of the silence from `generation.merged`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from twinserve.errors import TwinserveError
from twinserve.server.errors import InternalError, error_body
from twinserve.server.middleware import wire_of

log = logging.getLogger("twinserve.server")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

SSE_HEADERS = {
    "cache-control": "no-cache",
    # nginx and other proxies would otherwise buffer the stream
    "x-accel-buffering": "no",
}


def sse_content(event: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entry for a route that may answer 200 with SSE (a route that only
    streams takes `response_class=Response`, so that FastAPI documents no JSON 200 beside it)."""
    schema = {"description": f"Server-sent events: `data:` lines, each a JSON {event.__name__}"}
    return {200: {"content": {"text/event-stream": {"schema": schema}}}}


def sse_event(payload: BaseModel, *, exclude_none: bool = False) -> bytes:
    return b"data: " + payload.model_dump_json(exclude_none=exclude_none).encode() + b"\n\n"


def keepalive_s(request: Request) -> float:
    """Seconds of silence after which a stream sends KEEPALIVE."""
    seconds: float = request.app.state.sse_keepalive_s
    return seconds


def sse_response(
    request: Request, body: AsyncIterator[bytes], headers: dict[str, str] | None = None
) -> StreamingResponse:
    events = _with_errors(request, body)
    return StreamingResponse(
        events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )


async def _with_errors(request: Request, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    wire = wire_of(request.scope)
    try:
        async for chunk in body:
            yield chunk
        return
    except TwinserveError as exc:  # headers are sent: the error travels as the last event
        error: TwinserveError = exc
    except Exception:
        request_id = getattr(request.state, "request_id", None)
        log.exception("unhandled error in a stream", extra={"request_id": request_id})
        error = InternalError(request_id)
    yield sse_event(error_body(error, wire))
    if wire == "openai":
        yield DONE
