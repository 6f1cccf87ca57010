"""The RAG service's request context: an `x-request-id` in and out (and on to the LLM), one
JSON access-log line per request without the query text, and the payload limit. Pure ASGI, so
server-sent events pass through unbuffered."""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from twinserve.client import request_id as llm_request_id
from twinserve.client.context import is_valid_request_id

log = logging.getLogger("twinserve.rag.access")

_QUIET_PATHS = {"/health", "/metrics"}


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if is_valid_request_id(given):
                return given
    return uuid.uuid4().hex


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int, request_id: str) -> None:
    body = json.dumps(
        {
            "error": f"request body over the {limit}-byte limit",
            "error_type": "payload_too_large",
            "request_id": request_id,
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, payload_limit: int) -> None:
        self.app = app
        self.limit = payload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        started = time.monotonic()
        status = 500
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            await _too_large(send, self.limit, rid)
            self._log(scope, rid, 413, started)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            with llm_request_id(rid):  # every LLM call made for this request carries its id
                await self.app(scope, counting_receive, send_with_id)
        except _BodyTooLarge:
            status = 413
            await _too_large(send, self.limit, rid)
        finally:
            self._log(scope, rid, status, started)

    @staticmethod
    def _log(scope: Scope, rid: str, status: int, started: float) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path in _QUIET_PATHS and status < 400 else logging.INFO
        log.log(
            level,
            "request",
            extra={
                "request_id": rid,
                "method": scope.get("method"),
                "path": path,
                "status": status,
                "ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
