"""Relaying a container's 2xx answer once the gateway's 200 is out: as it is, or as events.

Nothing is buffered: each chunk goes out as it arrives (for a stream, as `PayloadPart`s).
Only reading the container is guarded here; a client that left is the caller's business (its
task group cancels the relay, which closes the container's connection).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from twinserve.platforms.local.gateway.eventstream import exception_event, payload_parts

log = logging.getLogger("twinserve.gateway")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def relay_body(response: httpx.Response, send: Send, name: str) -> None:
    chunks = response.aiter_bytes()
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except httpx.HTTPError as exc:
            # the 200 went out already: all that is left is to cut the answer short
            log.warning("endpoint %s broke off an answer: %s", name, exc)
            return
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def relay_events(response: httpx.Response, send: Send, name: str) -> None:
    """Each chunk of SSE bytes as PayloadParts; a failure of the container as the last event."""
    chunks = response.aiter_bytes()
    tail = b""
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except httpx.TimeoutException as exc:
            message = (
                f"ModelInvocationTimeExceeded: no bytes from the container in time ({type(exc).__name__})"
            )
            tail = exception_event("ModelStreamError", message, "ModelInvocationTimeExceeded")
            break
        except httpx.HTTPError as exc:
            log.warning("endpoint %s broke off a stream: %s", name, exc)
            message = f"StreamBroken: the connection to the container broke ({type(exc).__name__})"
            tail = exception_event("ModelStreamError", message, "StreamBroken")
            break
        except Exception:
            log.exception("relaying the stream of endpoint %s failed", name)
            tail = exception_event("InternalStreamFailure", "the gateway failed while relaying the stream")
            break
        for part in payload_parts(chunk):
            await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": tail, "more_body": False})
