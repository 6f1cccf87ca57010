"""The endpoint router: one stable URL in front of an endpoint's replicas (a pure-ASGI proxy).

Own routes: `GET /health` (200 while at least one replica takes requests, else 503; JSON of
the replica states), `GET /router/live` (200 while the router itself serves, replicas or not:
what the control plane probes), `GET /router/replicas`, `GET /router/stats` (load per traffic group, for
the autoscaler) and, when given, `GET /router/metrics` (the endpoint's Prometheus metrics). Everything else — every path, method, query
and body of the LLM microservice — goes to one replica chosen by `ReplicaPool.acquire`.

Async endpoints: `/async-invocations`, `/async-invocations/…` and `/async/…` go to the
endpoint's job service (`async_upstream`, synced from the state store) instead, with replicas
or without: a job is accepted while the endpoint has scaled to zero. Their bodies may be up
to `async_payload_limit` (6 MB, SageMaker's inline limit). Without a job service (a real-time
endpoint) they are a 404 that says so; while it restarts, a 503 with Retry-After.

Policy:
- The request body is read whole first (prompts are small), so a request can be re-sent; a
  body over `payload_limit` (the replicas' own limit) is refused with 413 before it is
  buffered: at once from Content-Length, else as soon as the bytes read pass the limit.
- Retry only what the client has seen nothing of: a connect error/timeout, the replica
  dropping the connection (or dying) before any status line, or a 503 (a replica answers 503
  only while loading, draining or dead: it ran nothing). The replica is marked unhealthy and the request goes to
  another one, at most `max_attempts` replicas in all (the last 503 is relayed when all
  fail). Any other status is the replica's answer, errors included: never retried, so no
  generation runs twice. This is what makes a blue/green switch and a scale-in lossless: a
  request that races a replica's SIGTERM lands on another replica.
- No replica can take it: 503 `{"error", "error_type": "unhealthy"}` (OpenAI's error shape
  on `/v1/*`) with `Retry-After: 1`.
- The response streams through chunk by chunk (SSE arrives token by token). A client that
  leaves cancels the upstream request, which closes the replica connection, so the replica
  aborts the generation. The replica's outstanding count is released in every case.
- Hop-by-hop headers are dropped both ways; `authorization`, `x-request-id` and the rest pass.
  With `api_key` the router also checks Bearer keys itself on the generation routes (as the
  server does; `/health`, `/ping`, `GET /`, `/info` and `/metrics` stay open, and the docs go
  to the replicas, which apply their own rule), so bad keys never reach a generation route.
  Without it the Authorization header simply passes to the replicas.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import httpx

from twinserve.api_keys import INVALID_KEY, key_matches
from twinserve.errors import (
    BadGatewayError,
    EngineDeadError,
    NotFoundError,
    PayloadTooLargeError,
    TwinserveError,
    UnauthorizedError,
)
from twinserve.platforms.local.router.health import HealthChecker
from twinserve.platforms.local.router.pool import Replica, ReplicaPool
from twinserve.server.errors import Wire, error_body, status_for
from twinserve.server.middleware import declares_more_than, payload_too_large

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "trailers", "upgrade"}
)
# routes any caller may reach even when the router has an API key (as on the server)
OPEN_PATHS = frozenset(
    {
        "/health",
        "/ping",
        "/info",
        "/metrics",
        "/router/live",
        "/router/metrics",
        "/async/health",
        "/async/metrics",
        "/docs",
        "/redoc",
        "/openapi.json",
    }
)
ASYNC_PREFIXES = ("/async-invocations/", "/async/")
# SageMaker's limit for an async request body sent inline (larger inputs go by location)
ASYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# failures before any status line: nothing reached the client, and a generation has no side
# effects, so running it on another replica is safe (a read *timeout* is not here: that
# replica may still be generating, and a retry would double the load of a slow endpoint)
RETRYABLE = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.RemoteProtocolError,
    httpx.WriteError,
    httpx.ReadError,
)
REPLICA_HEADER = "x-twinserve-replica"


def filter_headers(
    headers: list[tuple[bytes, bytes]], drop: frozenset[str] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """Headers minus hop-by-hop ones, `proxy-*`, those named in `Connection`, and `drop`."""
    named = {
        token.strip().lower()
        for key, value in headers
        if key.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    out = []
    for key, value in headers:
        name = key.decode("latin-1").lower()
        if name in HOP_BY_HOP or name in named or name in drop or name.startswith("proxy-"):
            continue
        out.append((key, value))
    return out


class RouterApp:
    """ASGI app forwarding to a `ReplicaPool`; starts its client and health checker on lifespan."""

    def __init__(
        self,
        pool: ReplicaPool,
        *,
        api_key: str | None = None,
        max_attempts: int = 3,
        health_interval: float = 1.0,
        health_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        read_timeout: float | None = None,
        max_connections: int = 1000,
        payload_limit: int = 2_000_000,
        async_payload_limit: int = ASYNC_PAYLOAD_LIMIT,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.pool = pool
        self.api_key = api_key
        self.max_attempts = max_attempts
        self.payload_limit = payload_limit
        self.async_payload_limit = async_payload_limit
        self.async_upstream: str | None = None  # the job service's base URL (async endpoints)
        self.metrics = metrics  # the endpoint's Prometheus exposition, served at /router/metrics
        self._client_options: dict[str, Any] = {
            "timeout": httpx.Timeout(connect_timeout, connect=connect_timeout, read=read_timeout, pool=None),
            "limits": httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        }
        self._health_options = {"interval": health_interval, "timeout": health_timeout}
        self._client: httpx.AsyncClient | None = None
        self.health: HealthChecker | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # used without lifespan (e.g. ASGITransport): no health checks
            self._client = httpx.AsyncClient(**self._client_options)
        return self._client

    async def startup(self) -> None:
        self.health = HealthChecker(self.pool, self.client, **self._health_options)
        await self.health.check_all()  # replicas that are already up take traffic at once
        self.health.start()

    async def shutdown(self) -> None:
        if self.health is not None:
            await self.health.stop()
            self.health = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websockets: none of the served routes use them; the server closes the connection

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            try:
                if kind == "lifespan.startup":
                    await self.startup()
                elif kind == "lifespan.shutdown":
                    await self.shutdown()
            except Exception as exc:
                await send({"type": f"{kind}.failed", "message": repr(exc)})
                raise
            await send({"type": f"{kind}.complete"})
            if kind == "lifespan.shutdown":
                return

    # ------------------------------------------------------------ routes
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if method in ("GET", "HEAD") and path == "/router/live":
            await _json(send, 200, {"live": True})
            return
        if path == "/async-invocations" or path.startswith(ASYNC_PREFIXES):
            if await self._authorized(scope, send):
                await self._proxy_async(scope, receive, send)
            return
        if method in ("GET", "HEAD") and path == "/health":
            replicas = [r.model_dump(mode="json") for r in self.pool.snapshot()]
            ok = any(r["status"] == "healthy" for r in replicas)
            await _json(send, 200 if ok else 503, {"healthy": ok, "replicas": replicas})
            return
        if method == "GET" and path == "/router/replicas":
            if await self._authorized(scope, send):
                body = {"replicas": [r.model_dump(mode="json") for r in self.pool.snapshot()]}
                await _json(send, 200, {**body, "weights": self.pool.weights})
            return
        if method == "GET" and path == "/router/metrics" and self.metrics is not None:
            exposition = await anyio.to_thread.run_sync(self.metrics)  # reads the state store
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", METRICS_TYPE)]}
            )
            await send({"type": "http.response.body", "body": exposition, "more_body": False})
            return
        if method == "GET" and path == "/router/stats":
            if await self._authorized(scope, send):
                stats = {k: v.model_dump() for k, v in self.pool.stats().items()}
                await _json(send, 200, {"groups": stats, "weights": self.pool.weights})
            return
        if await self._authorized(scope, send):
            await self._proxy(scope, receive, send)

    async def _authorized(self, scope: Scope, send: Send) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        if scope["path"] == "/" and scope["method"] in (
            "GET",
            "HEAD",
        ):  # TGI's health route; POST / generates
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if key_matches(headers, self.api_key):
            return True
        exc = UnauthorizedError(INVALID_KEY)
        await _error(send, scope, exc, {"www-authenticate": "Bearer"})
        return False

    # ------------------------------------------------------------ proxy
    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await _incoming(scope, receive, send, self.payload_limit)
        if request is None:
            return
        target, headers, body = request
        async with anyio.create_task_group() as tg:
            # a client that leaves cancels everything below, the upstream request included
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            await self._forward(scope, send, target, headers, body)
            tg.cancel_scope.cancel()

    async def _proxy_async(self, scope: Scope, receive: Receive, send: Send) -> None:
        """To the job service: one upstream, so the only retry is none (a connect error is a 503
        the client retries; the service answers a submit only once the job is durable)."""
        upstream = self.async_upstream
        if upstream is None:
            exc: TwinserveError = NotFoundError(
                "this endpoint is real-time only: create it with --async (or an `async:` block) "
                "to accept /async-invocations"
            )
            await _error(send, scope, exc)
            return
        incoming = await _incoming(scope, receive, send, self.async_payload_limit)
        if incoming is None:
            return
        target, headers, body = incoming
        request = self.client.build_request(scope["method"], upstream + target, headers=headers, content=body)
        try:
            response = await self.client.send(request)
        except httpx.HTTPError as exc:
            log.warning("the job service is unreachable: %s", type(exc).__name__)
            await _error(send, scope, EngineDeadError("the job service is restarting; try again"))
            return
        raw = filter_headers(response.headers.raw, drop=frozenset({"content-length"}))
        raw.append((b"content-length", str(len(response.content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": raw})
        await send({"type": "http.response.body", "body": response.content, "more_body": False})

    async def _forward(
        self, scope: Scope, send: Send, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        tried: list[str] = []
        last_error = "no replica is healthy"
        refused: tuple[httpx.Response, Replica] | None = None  # the last 503, relayed if all fail
        while len(tried) < self.max_attempts:
            replica = self.pool.acquire(exclude=tried)
            if replica is None:
                break
            tried.append(replica.id)
            served = False
            status: int | None = None
            try:
                request = self.client.build_request(
                    scope["method"], replica.url + target, headers=headers, content=body
                )
                try:
                    response = await self.client.send(request, stream=True)
                except RETRYABLE as exc:
                    last_error = f"replica {replica.id} unreachable: {type(exc).__name__}"
                    log.warning("%s; trying another replica", last_error)
                    self.pool.count_failure(replica, f"{type(exc).__name__}: {exc}")
                    continue
                except httpx.HTTPError as exc:
                    # maybe already generating (e.g. read timeout): never re-sent
                    self.pool.count_failure(replica, f"{type(exc).__name__}: {exc}")
                    await _error(send, scope, BadGatewayError(f"replica {replica.id} failed: {exc}"))
                    return
                served, status = True, response.status_code
                if response.status_code == 503 and len(tried) < self.max_attempts:
                    await response.aread()  # small JSON; frees the connection
                    self.pool.mark_unhealthy(replica, "answered 503 (loading, draining or dead)")
                    log.info("replica %s answered 503; trying another replica", replica.id)
                    refused = (response, replica)
                    continue
                await self._relay(response, replica, send)
                return
            finally:
                self.pool.release(replica, served=served, status=status)
        if refused is not None:
            await self._relay(*refused, send)
            return
        await _error(send, scope, EngineDeadError(f"{last_error}; try again"))

    async def _relay(self, response: httpx.Response, replica: Replica, send: Send) -> None:
        try:
            headers = filter_headers(response.headers.raw)
            headers.append((REPLICA_HEADER.encode(), replica.id.encode()))
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            if response.is_stream_consumed:  # a refused (503) answer, read while retrying
                await send({"type": "http.response.body", "body": response.content, "more_body": False})
                return
            try:
                async for chunk in response.aiter_raw():
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                # the status line went out already: all we can do is cut the response short
                log.warning("replica %s broke off a response: %s", replica.id, exc)
                self.pool.count_failure(replica, f"{type(exc).__name__} mid-response: {exc}")
                return  # an incomplete response: the server closes the client connection
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


def create_router_app(pool: ReplicaPool, *, api_key: str | None = None, **options: Any) -> RouterApp:
    """The router as an ASGI app; `options` are `RouterApp`'s (attempts, intervals, timeouts)."""
    return RouterApp(pool, api_key=api_key, **options)


async def _incoming(
    scope: Scope, receive: Receive, send: Send, limit: int
) -> tuple[str, list[tuple[bytes, bytes]], bytes] | None:
    """The request to forward: (path and query, headers, whole body); None once it has been
    answered (413 past `limit`) or the client left before sending it."""
    try:
        body = await _read_body(scope, receive, limit)
    except PayloadTooLargeError as exc:
        await _error(send, scope, exc)
        return None
    if body is None:
        return None
    headers = filter_headers(scope["headers"], drop=frozenset({"host", "content-length"}))
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    return target.decode("latin-1"), headers, body


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, None if the client left; PayloadTooLargeError past `limit` bytes."""
    if declares_more_than(scope, limit):
        raise payload_too_large(limit)
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _json(send: Send, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(
    send: Send, scope: Scope, exc: TwinserveError, headers: dict[str, str] | None = None
) -> None:
    """The error in the caller's wire format (OpenAI on `/v1/*`, else TGI)."""
    wire: Wire = "openai" if scope["path"].startswith("/v1/") else "tgi"
    out = dict(headers or {})
    status = status_for(exc, wire)
    if status in (429, 502, 503):
        out.setdefault("retry-after", "1")
    with contextlib.suppress(Exception):  # the client may be gone already
        await _json(send, status, error_body(exc, wire).model_dump(), out)
