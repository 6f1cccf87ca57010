"""`ASGIStreamTransport`: httpx straight into an ASGI app in the same process, streaming.

For the monolith mode (the RAG service and the LLM server in one process): no socket and no
second server, and unlike `httpx.ASGITransport`, which collects the whole body before it
returns, a response is handed over as the app sends it, so a token stream stays a stream.

Each request runs the app in a task of its own. The app's `send` puts its messages on an
asyncio.Queue that the response's body stream reads. Closing the response before its end (a
caller that stopped reading) makes the app's `receive` return `http.disconnect`, as a server
does when the peer hangs up, and twinserve's routes abort the generation on it; later sends
are dropped, as uvicorn drops them (and like uvicorn the scope says ASGI spec 2.3, so
Starlette watches `receive` for the disconnect while it streams). Closing waits for the app to
wind down (`CLOSE_GRACE_S` at most, then its task is cancelled), so its cleanup is done, and
the generation aborted, when `aclose()` returns.

Failures never hang the caller: an app that raises (or returns) before its response starts is
a 500 (the traceback goes to the log); one that raises mid-body breaks the stream with
`httpx.ReadError`, and one that returns mid-body with `httpx.RemoteProtocolError`, as a
dropped connection would; the client's read timeout bounds every wait for a message
(`httpx.ReadTimeout`, and the app is told the client left). `HttpTransport` translates these
into twinserve's errors as it does for a socket's.

The queue is unbounded: an answer is small, and a producer paced by token generation cannot
outrun its consumer by much (as in `_threads`). The app's lifespan is its host's to run
(`async with app.router.lifespan_context(app): …` for a FastAPI app), not the transport's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

log = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

CLOSE_GRACE_S = 5.0  # how long a closed response waits for the app to finish before cancelling it
_END = object()  # the app returned
_DISCONNECT: Message = {"type": "http.disconnect"}


class ASGIStreamTransport(httpx.AsyncBaseTransport):
    """Requests to `app`, an ASGI 3 application on this event loop; responses stream."""

    def __init__(
        self, app: ASGIApp, *, client: tuple[str, int] = ("127.0.0.1", 0), root_path: str = ""
    ) -> None:
        self.app = app
        self.client = client
        self.root_path = root_path
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        timeout = request.extensions.get("timeout", {}).get("read")
        exchange = _Exchange(self.app, self._scope(request), body, timeout)
        task = asyncio.create_task(exchange.run(), name=f"asgi {request.method} {request.url.path}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        exchange.task = task
        try:
            start = await exchange.start()
        except BaseException:  # timed out, or the caller was cancelled: the app is told it left
            exchange.disconnect()
            raise
        if start is None:
            exchange.disconnect()
            return httpx.Response(500, text="Internal Server Error", request=request)
        return httpx.Response(
            start["status"],
            headers=list(start.get("headers", [])),
            stream=_ResponseStream(exchange),
            request=request,
        )

    def _scope(self, request: httpx.Request) -> dict[str, Any]:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": url.scheme,
            "path": url.path,
            "raw_path": url.raw_path.split(b"?")[0],
            "query_string": url.query,
            "root_path": self.root_path,
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
            "server": (url.host, port),
            "client": self.client,
        }

    async def aclose(self) -> None:
        """Cancel what still runs (responses never closed): nothing outlives the transport."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Exchange:
    """One request/response between the client and a run of the app."""

    def __init__(self, app: ASGIApp, scope: dict[str, Any], body: bytes, read_timeout: float | None) -> None:
        self._app = app
        self._scope = scope
        self._body: bytes | None = body
        self._read_timeout = read_timeout
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._left = asyncio.Event()  # the client is gone (closed early, timed out, cancelled)
        self.task: asyncio.Task[None] | None = None
        self.complete = False  # the app sent its last body message

    # ------------------------------------------------------------ the app's side
    async def run(self) -> None:
        try:
            await self._app(self._scope, self._receive, self._send)
        except Exception as exc:  # handed to the client as a 500 or a broken stream; logged here
            log.exception("in-process app failed", extra={"path": self._scope["path"]})
            self._queue.put_nowait(exc)
        finally:
            self._queue.put_nowait(_END)

    async def _receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._left.wait()
        return dict(_DISCONNECT)

    async def _send(self, message: Message) -> None:
        if not self._left.is_set():
            self._queue.put_nowait(message)

    # --------------------------------------------------------- the client's side
    async def _next(self) -> Any:
        try:
            async with asyncio.timeout(self._read_timeout):
                return await self._queue.get()
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"the app sent nothing for {self._read_timeout} s") from exc

    async def start(self) -> Message | None:
        """The `http.response.start` message; None when the app failed or returned before it."""
        item = await self._next()
        if isinstance(item, dict) and item.get("type") == "http.response.start":
            return item
        if isinstance(item, dict):
            log.error("in-process app sent %r before http.response.start", item.get("type"))
        elif item is _END:
            log.error("in-process app returned without a response", extra={"path": self._scope["path"]})
        return None

    async def body(self) -> AsyncIterator[bytes]:
        while not self.complete:
            item = await self._next()
            if item is _END:
                raise httpx.RemoteProtocolError("the app ended before its response was complete")
            if isinstance(item, BaseException):
                raise httpx.ReadError(f"the app failed mid-response: {type(item).__name__}") from item
            if item.get("type") != "http.response.body":
                continue  # e.g. trailers: nothing httpx would hand over here
            self.complete = not item.get("more_body", False)
            chunk = item.get("body", b"")
            if chunk:
                yield bytes(chunk)

    def disconnect(self) -> None:
        self._left.set()

    async def close(self) -> None:
        """Tell the app the client left (unless it finished) and let it wind down."""
        self.disconnect()
        task = self.task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=CLOSE_GRACE_S)
        if not done:
            log.warning("in-process app still running %g s after the client left: cancelled", CLOSE_GRACE_S)
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_GRACE_S)  # its cleanup; one that hangs on is left


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._exchange.body():
            yield chunk

    async def aclose(self) -> None:
        await self._exchange.close()
