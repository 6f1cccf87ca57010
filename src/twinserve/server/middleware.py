"""Request context (an `x-request-id` in and out, one access-log line per request), the
catch-all for bugs, and the payload limit. Pure ASGI (no BaseHTTPMiddleware) so streamed
responses pass through untouched.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twinserve.errors import PayloadTooLargeError, TwinserveError
from twinserve.server.errors import InternalError, Wire, error_response

log = logging.getLogger("twinserve.access")
errors_log = logging.getLogger("twinserve.server")

_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# probes that would drown the log at INFO
_QUIET_PATHS = {"/health", "/ping", "/metrics"}


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _access_log(scope, state, request_id, status, time.monotonic() - started)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _VALID_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def _access_log(scope: Scope, state: dict[str, Any], request_id: str, status: int, seconds: float) -> None:
    path = scope.get("path", "")
    level = logging.DEBUG if path in _QUIET_PATHS and status < 500 else logging.INFO
    if not log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": scope.get("method"),
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 1),
    }
    generation = state.get("generation")
    if generation is not None:
        fields.update(generation.summary())
        if "prompt" in state:  # only when the server runs with log_prompts
            fields["prompt"] = state["prompt"]
            if generation.final is not None:
                fields["generated_text"] = generation.final.generated_text
    log.log(level, "request", extra=fields)


def wire_of(scope: Scope) -> Wire:
    """The protocol a request's errors are answered in: the route's (set while it ran), else by path."""
    wire = scope.get("state", {}).get("wire")
    if wire in ("tgi", "openai"):
        return wire
    return "openai" if scope.get("path", "").startswith("/v1/") else "tgi"


class CatchAllMiddleware:
    """Any exception no handler answered becomes a 500 in the route's protocol, with the request
    id and no internals (the traceback goes to the log), and never reaches the server.

    `on_error(scope, error)` lets the app count it in its failure metrics.
    """

    def __init__(self, app: ASGIApp, on_error: Callable[[Scope, TwinserveError], None] | None = None) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            request_id = scope.get("state", {}).get("request_id")
            errors_log.exception(
                "unhandled error", extra={"request_id": request_id, "path": scope.get("path")}
            )
            error = InternalError(request_id)
            if self.on_error is not None:
                self.on_error(scope, error)
            if not started:  # else the response is cut short: all a server can do mid-body
                await error_response(error, wire_of(scope))(scope, receive, send)


def payload_too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"request body is larger than the payload limit ({limit} bytes)")


def declares_more_than(scope: Scope, limit: int) -> bool:
    """Whether the request's Content-Length is over `limit` (refused before reading a byte)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return value.isdigit() and int(value) > limit
    return False


class PayloadLimitMiddleware:
    """413 for bodies over `limit` bytes: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = payload_too_large(self.limit)
        if declares_more_than(scope, self.limit):
            await error_response(error, wire_of(scope))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise error  # inside body parsing: the app's error handler answers 413
            return message

        await self.app(scope, counting_receive, send)
