"""How a JSON request reaches a server: the `Transport` seam and its HTTP implementation.

`LLMClient` speaks the wire formats; a transport only moves bytes. It returns the
status, headers and body as they came (error mapping stays in the client, the same
for every transport) and translates its own failures into `UnreachableError` (nothing
was sent, safe to retry) and `RequestTimeoutError`. A SageMaker-runtime transport
plugs in here: `InvokeEndpoint` for `send`, `InvokeEndpointWithResponseStream` for
`stream`, with the path telling it which body shape is coming. `get` (and `aget`) fetch a
server's own routes (`/info`, `/health`); a transport that cannot reach a route (SageMaker
Runtime reaches only `/invocations`) raises `NotFoundError` for it, as a server without it
would answer.

`HttpTransport` sends the id of an enclosing `twinserve.client.request_id(...)` block as
`x-request-id`; with `app=` it reaches an ASGI app in this process through
`asgi_transport.ASGIStreamTransport` instead of a socket (async calls only).

Asynchronous invocations (`submit_job`, `job_status`, `job_output` and their async twins)
follow the job service's API: every transport answers as `POST /async-invocations` (202 and
`{"inference_id", "status", "output_location", "failure_location"}`), `GET
/async-invocations/{id}` (the job's status as JSON) and `GET /async-invocations/{id}/output`
(the stored answer; a failed job's error body with `x-job-status: failed`; 409 while it runs)
would, so `LLMClient` reads one shape whichever platform holds the job.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, SSEError

from twinserve.client.asgi_transport import ASGIApp, ASGIStreamTransport
from twinserve.client.context import current_request_id
from twinserve.errors import RequestTimeoutError, ServerError, UnreachableError


@dataclass(frozen=True)
class Response:
    """A complete answer. `headers` has lower-case names."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class StreamResponse:
    """A streamed answer: `events` yields each SSE `data:` payload in order (2xx only);
    for any other status `body` holds the whole (error) body and `events` is empty."""

    status: int
    headers: Mapping[str, str]
    events: Iterator[str] = field(default_factory=lambda: iter(()))
    body: bytes = b""


@dataclass(frozen=True)
class AsyncStreamResponse:
    """`StreamResponse` for the async path."""

    status: int
    headers: Mapping[str, str]
    events: AsyncIterator[str] = field(default_factory=lambda: _no_events())
    body: bytes = b""


@dataclass(frozen=True)
class AsyncRequest:
    """One asynchronous invocation to queue: its body inline, or the location of its input.

    `request_ttl_s` and `invocation_timeout_s` are SageMaker's RequestTTLSeconds and
    InvocationTimeoutSeconds (None: the endpoint's defaults).
    """

    body: bytes | None = None
    input_location: str | None = None
    content_type: str = "application/json"
    accept: str = "application/json"
    inference_id: str | None = None
    request_ttl_s: int | None = None
    invocation_timeout_s: int | None = None

    def __post_init__(self) -> None:
        if (self.body is None) == (self.input_location is None):
            raise ValueError("an async request needs exactly one of body and input_location")


@dataclass(frozen=True)
class AsyncRef:
    """What names a queued invocation: its id, and where its answer or error body will be
    (a transport without a status API, SageMaker's, looks there)."""

    inference_id: str
    output_location: str | None = None
    failure_location: str | None = None


async def _no_events() -> AsyncIterator[str]:
    return
    yield  # pragma: no cover - makes this an async generator


class Transport(Protocol):
    """Sends one JSON body to a path (`/generate`, `/v1/chat/completions`, …)."""

    def send(self, path: str, payload: Mapping[str, Any]) -> Response: ...

    def stream(self, path: str, payload: Mapping[str, Any]) -> AbstractContextManager[StreamResponse]: ...

    def get(self, path: str) -> Response:
        """`GET path`: a server's own route (`/info`, `/health`)."""
        ...

    async def asend(self, path: str, payload: Mapping[str, Any]) -> Response: ...

    async def aget(self, path: str) -> Response: ...

    def astream(
        self, path: str, payload: Mapping[str, Any]
    ) -> AbstractAsyncContextManager[AsyncStreamResponse]: ...

    def submit_job(self, request: AsyncRequest) -> Response: ...

    def job_status(self, ref: AsyncRef) -> Response: ...

    def job_output(self, ref: AsyncRef) -> Response: ...

    async def asubmit_job(self, request: AsyncRequest) -> Response: ...

    async def ajob_status(self, ref: AsyncRef) -> Response: ...

    async def ajob_output(self, ref: AsyncRef) -> Response: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


class HttpTransport:
    """httpx over HTTP(S), SSE parsed by httpx-sse; sends the API key as `Authorization: Bearer`.

    The sync and async httpx clients are created on first use. An async client belongs
    to the event loop that first used it: call `aclose()` before using it from another.

    `app`: an ASGI app in this process (the monolith mode: `HttpTransport("http://llm",
    app=create_app(...))`) is called directly, streams included, with no socket in between;
    `base_url` then only names it. Only the async calls can reach it (it lives on the event
    loop): a sync call raises RuntimeError. Its lifespan is its host's to run.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float | None = 120.0,
        connect_timeout: float = 10.0,
        max_connections: int | None = None,
        max_keepalive_connections: int | None = 64,
        headers: Mapping[str, str] | None = None,
        app: ASGIApp | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._app = app
        self._headers = {"accept": "application/json", **(headers or {})}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        # None: the caller bounds concurrency (a benchmark at 256 must not queue in the pool)
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_keepalive_connections
        )
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        # the key is only ever in the client's default headers, never in a repr or a message
        auth = ", api_key=***" if "authorization" in self._headers else ""
        where = ", in_process=True" if self._app is not None else ""
        return f"HttpTransport({self.base_url!r}{auth}{where})"

    # ---------------------------------------------------------------- sync
    def _sync(self) -> httpx.Client:
        if self._app is not None:
            raise RuntimeError(
                f"{self!r} calls an app on this process's event loop: use the async calls "
                "(agenerate, achat, achat_stream, ainfo, …)"
            )
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout, limits=self._limits
            )
        return self._client

    def send(self, path: str, payload: Mapping[str, Any]) -> Response:
        with _translated(self.base_url, path):
            r = self._sync().post(path, json=payload, headers=_with_request_id())
            return Response(r.status_code, _headers(r), r.content)

    @contextmanager
    def stream(self, path: str, payload: Mapping[str, Any]) -> Iterator[StreamResponse]:
        with (
            _translated(self.base_url, path),
            self._sync().stream("POST", path, json=payload, headers=_with_request_id(_SSE)) as r,
        ):
            if not r.is_success:
                yield StreamResponse(r.status_code, _headers(r), body=r.read())
                return
            events = self._events(r, path)
            try:
                yield StreamResponse(r.status_code, _headers(r), events=events)
            finally:
                events.close()  # a caller that stopped early leaves it suspended

    def _events(self, response: httpx.Response, path: str) -> Generator[str, None, None]:
        # translated here too: the generator runs after `stream()` has returned it
        with _translated(self.base_url, path):
            for event in EventSource(response).iter_sse():
                yield event.data

    def submit_job(self, request: AsyncRequest) -> Response:
        with _translated(self.base_url, ASYNC_INVOCATIONS):
            r = self._sync().post(
                ASYNC_INVOCATIONS,
                content=request.body or b"",
                headers=_with_request_id(_job_headers(request)),
            )
            return Response(r.status_code, _headers(r), r.content)

    def job_status(self, ref: AsyncRef) -> Response:
        return self.get(_job_path(ref))

    def job_output(self, ref: AsyncRef) -> Response:
        return self.get(f"{_job_path(ref)}/output")

    def get(self, path: str) -> Response:
        with _translated(self.base_url, path):
            r = self._sync().get(path, headers=_with_request_id(_ANY))
            return Response(r.status_code, _headers(r), r.content)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --------------------------------------------------------------- async
    def _async(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                timeout=self._timeout,
                limits=self._limits,
                transport=ASGIStreamTransport(self._app) if self._app is not None else None,
            )
        return self._aclient

    async def asend(self, path: str, payload: Mapping[str, Any]) -> Response:
        with _translated(self.base_url, path):
            r = await self._async().post(path, json=payload, headers=_with_request_id())
            return Response(r.status_code, _headers(r), r.content)

    @asynccontextmanager
    async def astream(self, path: str, payload: Mapping[str, Any]) -> AsyncIterator[AsyncStreamResponse]:
        with _translated(self.base_url, path):
            async with self._async().stream("POST", path, json=payload, headers=_with_request_id(_SSE)) as r:
                if not r.is_success:
                    yield AsyncStreamResponse(r.status_code, _headers(r), body=await r.aread())
                    return
                events = self._aevents(r, path)
                try:
                    yield AsyncStreamResponse(r.status_code, _headers(r), events=events)
                finally:
                    await events.aclose()  # else the event loop finalizes it later, noisily

    async def _aevents(self, response: httpx.Response, path: str) -> AsyncGenerator[str, None]:
        with _translated(self.base_url, path):
            async for event in EventSource(response).aiter_sse():
                yield event.data

    async def asubmit_job(self, request: AsyncRequest) -> Response:
        with _translated(self.base_url, ASYNC_INVOCATIONS):
            r = await self._async().post(
                ASYNC_INVOCATIONS,
                content=request.body or b"",
                headers=_with_request_id(_job_headers(request)),
            )
            return Response(r.status_code, _headers(r), r.content)

    async def ajob_status(self, ref: AsyncRef) -> Response:
        return await self.aget(_job_path(ref))

    async def ajob_output(self, ref: AsyncRef) -> Response:
        return await self.aget(f"{_job_path(ref)}/output")

    async def aget(self, path: str) -> Response:
        with _translated(self.base_url, path):
            r = await self._async().get(path, headers=_with_request_id(_ANY))
            return Response(r.status_code, _headers(r), r.content)

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None


_SSE = {"accept": "text/event-stream"}
_ANY = {"accept": "*/*"}  # a stored answer comes in the type it was stored with
ASYNC_INVOCATIONS = "/async-invocations"


def _job_path(ref: AsyncRef) -> str:
    return f"{ASYNC_INVOCATIONS}/{quote(ref.inference_id, safe='')}"


def _job_headers(request: AsyncRequest) -> dict[str, str]:
    """The job service's request headers (its names; the body, if any, goes as it is)."""
    headers = {"content-type": request.content_type, "accept": request.accept}
    for name, value in (
        ("x-input-location", request.input_location),
        ("x-inference-id", request.inference_id),
        ("x-request-ttl-seconds", request.request_ttl_s),
        ("x-invocation-timeout-seconds", request.invocation_timeout_s),
    ):
        if value is not None:
            headers[name] = str(value)
    return headers


def _with_request_id(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    """A request's own headers, with the enclosing `request_id(...)` block's id if any."""
    out = dict(headers or {})
    rid = current_request_id()
    if rid is not None:
        out["x-request-id"] = rid
    return out


def _headers(response: httpx.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.headers.items()}


@contextmanager
def _translated(base_url: str, path: str) -> Iterator[None]:
    """httpx's failures as twinserve errors (the message names the URL, never a header)."""
    url = f"{base_url}{path}"
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise UnreachableError(f"cannot connect to {url}: {exc or type(exc).__name__}") from exc
    except httpx.TimeoutException as exc:
        raise RequestTimeoutError(f"no answer from {url} in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        error = ServerError(f"connection to {url} failed: {exc or type(exc).__name__}")
        error.status_code = 502
        raise error from exc
    except SSEError as exc:
        error = ServerError(f"{url} did not answer with an event stream: {exc}")
        error.status_code = 502
        raise error from exc
