"""The SageMaker Runtime API for every local endpoint, on one port (a pure-ASGI proxy).

sagemaker-runtime's REST binding, so `boto3.client("sagemaker-runtime", endpoint_url=URL)`
works unchanged:
- `POST /endpoints/{name}/invocations` (InvokeEndpoint) → the endpoint's router `/invocations`;
  a 2xx answer streams back as is, with `X-Amzn-Invoked-Production-Variant`. A container
  4xx/5xx becomes SageMaker's 424 `ModelError` carrying `OriginalStatusCode` and
  `OriginalMessage` (the container's body).
- `POST /endpoints/{name}/invocations-response-stream` (InvokeEndpointWithResponseStream) →
  the router's `/invocations` with `"stream": true` set in the JSON body; the SSE bytes go out
  as event-stream `PayloadPart`s as they arrive (never buffered), and a break after the 200 as
  a `ModelStreamError` (or `InternalStreamFailure`) event.
- `POST /endpoints/{name}/async-invocations` (InvokeEndpointAsync, async endpoints only) →
  the router's `/async-invocations`, i.e. the endpoint's job service (`async_invoke` maps the
  headers both ways); the 202 is SageMaker's `InferenceId` and locations.
- `GET /ping` (and `/health`): 200, for whoever starts the gateway.

Only local endpoints that take traffic are served; any other name is SageMaker's
"Endpoint X of account Y not found." (a ValidationError). An endpoint with an `api_key` needs
a SigV4 signature made with that key as the secret access key (`sigv4.verify`), else 403;
an open one takes any credentials. The gateway then calls the router with the key as a Bearer
token. Bodies are limited to the endpoint's `payload_limit` and SageMaker's 6 MB, whichever is
smaller. As in SageMaker, request headers other than the API's own are not forwarded; unlike
SageMaker, the container's own response headers (`x-request-id`, token counts) come back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import anyio
import httpx

from twinserve.deploy.spec import Endpoint, EndpointStatus
from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError
from twinserve.platforms.local.gateway import async_invoke, errors
from twinserve.platforms.local.gateway.errors import AwsError
from twinserve.platforms.local.gateway.eventstream import CONTENT_TYPE as EVENTSTREAM
from twinserve.platforms.local.gateway.relay import relay_body, relay_events
from twinserve.platforms.local.gateway.sigv4 import SignatureError, SignedRequest, verify
from twinserve.platforms.local.router.app import REPLICA_HEADER, filter_headers

log = logging.getLogger("twinserve.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SAGEMAKER_PAYLOAD_LIMIT = 6 * 1024 * 1024  # InvokeEndpoint's limit on a request body
_ROUTE = re.compile(
    r"^/endpoints/(?P<name>[^/]+)/(?P<op>invocations|invocations-response-stream|async-invocations)$"
)
_VARIANT_HEADER = "x-amzn-invoked-production-variant"
# a submit is one durable write in the job service: it answers in well under this
_SUBMIT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# upstream headers not relayed: the router's own, and those the gateway sets itself
_DROP = frozenset({REPLICA_HEADER, "server", "date", "content-length"})


@dataclass(frozen=True)
class _Call:
    """One invocation, resolved: where it goes and what comes back to say so."""

    endpoint: Endpoint
    url: str  # the router's, or a replica's for a targeted variant
    variant: str | None  # the targeted variant, if any
    stream: bool
    request_id: str
    request: httpx.Request


class GatewayApp:
    """ASGI app serving sagemaker-runtime for the local endpoints in `store`."""

    def __init__(
        self,
        store: StateStore,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float | None = None,
        max_connections: int = 1000,
        max_skew_s: float = 900.0,
    ) -> None:
        self.store = store
        self.max_skew_s = max_skew_s
        # read_timeout None: the caller's SDK timeout bounds a call (SageMaker's own is 60 s)
        self._client_options: dict[str, Any] = {
            "timeout": httpx.Timeout(connect_timeout, connect=connect_timeout, read=read_timeout, pool=None),
            "limits": httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        }
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # one per app (without lifespan: on first use)
            self._client = httpx.AsyncClient(**self._client_options)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------ routes
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        request_id = str(uuid.uuid4())
        if method in ("GET", "HEAD") and path in ("/ping", "/health"):
            await _json(send, 200, {"status": "Healthy"})
            return
        match = _ROUTE.match(path)
        try:
            if match is None or method != "POST":
                raise AwsError(404, "UnknownOperationException", f"no operation at {method} {path}")
            if match["op"] == "async-invocations":
                await self._submit_async(scope, receive, send, unquote(match["name"]), request_id)
                return
            call = await self._resolve(scope, receive, unquote(match["name"]), match["op"], request_id)
        except AwsError as exc:
            await _error(send, exc, request_id)
            return
        except Exception:  # a bug, or the store unreadable: SageMaker's InternalFailure, logged
            log.exception("gateway call %s failed", request_id)
            await _error(
                send, errors.internal_failure(f"the gateway failed (request {request_id})"), request_id
            )
            return
        if call is None:
            return  # the client left while sending its body
        async with anyio.create_task_group() as tg:
            # a client that leaves cancels the upstream request: the replica aborts the generation
            tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
            await self._forward(call, send)
            tg.cancel_scope.cancel()

    async def _resolve(
        self, scope: Scope, receive: Receive, name: str, op: str, request_id: str
    ) -> _Call | None:
        """The endpoint, the checked body and the upstream request; AwsError when refused."""
        endpoint = await anyio.to_thread.run_sync(self._endpoint, name)  # SQLite: off the loop
        limit = min(endpoint.config.payload_limit, SAGEMAKER_PAYLOAD_LIMIT)
        body = await _read_body(scope, receive, limit)
        if body is None:
            return None
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        key = endpoint.config.api_key.get_secret_value() if endpoint.config.api_key else None
        if key is not None:
            self._check_signature(scope, headers, body, key)
        stream = op == "invocations-response-stream"
        url, variant = _target(endpoint, _header(headers, "x-amzn-sagemaker-target-variant"))
        upstream = self.client.build_request(
            "POST",
            f"{url}/invocations",
            headers=_upstream_headers(headers, key, request_id, stream=stream),
            content=_streaming_body(body) if stream else body,
        )
        return _Call(endpoint, url, variant, stream, request_id, upstream)

    async def _submit_async(
        self, scope: Scope, receive: Receive, send: Send, name: str, request_id: str
    ) -> None:
        """InvokeEndpointAsync: checked here, queued by the job service behind the router."""
        endpoint = await anyio.to_thread.run_sync(self._endpoint, name)
        limit = min(endpoint.config.payload_limit, async_invoke.ASYNC_INLINE_LIMIT)
        body = await _read_body(scope, receive, limit)
        if body is None:
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        key = endpoint.config.api_key.get_secret_value() if endpoint.config.api_key else None
        if key is not None:
            self._check_signature(scope, headers, body, key)
        async_invoke.check_async(endpoint)  # after the signature: only the key holder learns it
        assert endpoint.url is not None  # checked in `_endpoint`
        upstream = async_invoke.job_headers(dict(headers), body, key, request_id)
        url = f"{endpoint.url}/async-invocations"
        try:
            response = await self.client.post(url, headers=upstream, content=body, timeout=_SUBMIT_TIMEOUT)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing queued: try again
            raise errors.service_unavailable(
                f"Endpoint {name} does not answer ({type(exc).__name__})."
            ) from None
        except httpx.HTTPError as exc:  # sent, maybe queued: only the same InferenceId is a safe retry
            raise errors.internal_failure(
                f"Endpoint {name} did not confirm the request ({type(exc).__name__}); it may be queued: "
                "retry with the same InferenceId."
            ) from None
        raw, answer = async_invoke.accepted(response, name, request_id)
        await send({"type": "http.response.start", "status": 202, "headers": raw})
        await send({"type": "http.response.body", "body": answer, "more_body": False})

    def _endpoint(self, name: str) -> Endpoint:
        try:
            endpoint = self.store.get_endpoint(name)
        except NotFoundError:
            raise errors.not_found(name) from None
        if endpoint.config.platform.type != "local":
            raise errors.not_found(name)  # served by its own platform, not on this machine
        if endpoint.status is EndpointStatus.CREATING:
            raise errors.service_unavailable(f"Endpoint {name} is still being created; try again shortly.")
        if not endpoint.status.accepts_traffic or endpoint.url is None:
            raise errors.validation(
                f"Endpoint {name} of account {errors.ACCOUNT} is {endpoint.status} and takes no requests."
            )
        return endpoint

    def _check_signature(self, scope: Scope, headers: list[tuple[str, str]], body: bytes, key: str) -> None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        request = SignedRequest(
            scope["method"],
            raw_path.decode("latin-1"),
            scope["query_string"].decode("latin-1"),
            headers,
            body,
        )
        try:
            verify(request, key, max_skew_s=self.max_skew_s)
        except SignatureError as exc:
            raise errors.access_denied(exc.code, str(exc)) from None
        except ImportError:
            raise errors.internal_failure(
                "checking SigV4 signatures needs botocore: pip install 'twinserve[aws]'"
            ) from None

    # ------------------------------------------------------------ forward
    async def _forward(self, call: _Call, send: Send) -> None:
        name = call.endpoint.name
        try:
            response = await self.client.send(call.request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failure = errors.service_unavailable(f"Endpoint {name} does not answer ({type(exc).__name__}).")
            await _error(send, failure, call.request_id)
            return
        except httpx.TimeoutException:
            timeout = errors.model_error(name, 504, "timed out waiting for the container's answer")
            await _error(send, timeout, call.request_id)
            return
        except httpx.HTTPError as exc:
            failure = errors.service_unavailable(f"Endpoint {name} failed: {type(exc).__name__}.")
            await _error(send, failure, call.request_id)
            return
        try:
            if not response.is_success:
                original = (await response.aread()).decode("utf-8", errors="replace")
                retry = response.headers.get("retry-after")
                failure = errors.model_error(name, response.status_code, original, retry_after=retry)
                await _error(send, failure, response.headers.get("x-request-id", call.request_id))
                return
            await send(
                {"type": "http.response.start", "status": 200, "headers": _answer_headers(call, response)}
            )
            if call.stream:
                await relay_events(response, send, name)
            else:
                await relay_body(response, send, name)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


def create_gateway_app(store: StateStore, **options: Any) -> GatewayApp:
    """The gateway as an ASGI app; `options` are `GatewayApp`'s (timeouts, connections, skew)."""
    return GatewayApp(store, **options)


# ---------------------------------------------------------------- requests
def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _target(endpoint: Endpoint, variant: str | None) -> tuple[str, str | None]:
    """The router's URL; with a TargetVariant, a serving replica of that variant (no router)."""
    if variant is None:
        assert endpoint.url is not None  # checked in `_endpoint`
        return endpoint.url, None
    if variant not in {v.name for v in endpoint.config.variants}:
        raise errors.validation(f"Variant {variant} of endpoint {endpoint.name} not found.")
    serving = [r for r in endpoint.replicas if r.variant == variant and r.state.serves]
    if not serving:
        raise errors.service_unavailable(
            f"Variant {variant} of endpoint {endpoint.name} has no healthy replica."
        )
    return random.choice(serving).url, variant


def _upstream_headers(
    headers: list[tuple[str, str]], key: str | None, request_id: str, *, stream: bool
) -> dict[str, str]:
    """What SageMaker passes to a container: the content type, accept, custom attributes."""
    accept = _header(headers, "x-amzn-sagemaker-accept" if stream else "accept")
    out = {
        "content-type": _header(headers, "content-type") or errors.JSON,
        "accept": accept or ("text/event-stream" if stream else errors.JSON),
        "x-request-id": request_id,
    }
    attributes = _header(headers, "x-amzn-sagemaker-custom-attributes")
    if attributes is not None:
        out["x-amzn-sagemaker-custom-attributes"] = attributes
    if key is not None:
        out["authorization"] = f"Bearer {key}"
    return out


def _streaming_body(body: bytes) -> bytes:
    """The body with `"stream": true` (TGI's, chat and completion bodies all read it there);
    anything that is not a JSON object goes as it came, for the container to judge."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict):
        return body
    return json.dumps({**payload, "stream": True}).encode()


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body (at most `limit` bytes, else a 413 ValidationError); None if the client left."""
    too_large = errors.validation(f"Request body is larger than the endpoint's limit of {limit} bytes.", 413)
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        if (await receive())["type"] == "http.disconnect":
            scope.cancel()
            return


# ---------------------------------------------------------------- answers
def _answer_headers(call: _Call, response: httpx.Response) -> list[tuple[bytes, bytes]]:
    variant = call.variant or _variant_of(call.endpoint, response.headers.get(REPLICA_HEADER))
    out = filter_headers(response.headers.raw, drop=_DROP)
    if call.stream:
        inner = response.headers.get("content-type", "text/event-stream")
        out = [(k, v) for k, v in out if k.lower() != b"content-type"]
        out += [(b"content-type", EVENTSTREAM.encode()), (b"x-amzn-sagemaker-content-type", inner.encode())]
    request_id = response.headers.get("x-request-id", call.request_id)
    return [*out, (_VARIANT_HEADER.encode(), variant.encode()), (b"x-amzn-requestid", request_id.encode())]


def _variant_of(endpoint: Endpoint, replica_id: str | None) -> str:
    for replica in endpoint.replicas:
        if replica.id == replica_id:
            return replica.variant
    return endpoint.config.variants[0].name


async def _json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", errors.JSON.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(send: Send, exc: AwsError, request_id: str) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        await send(
            {"type": "http.response.start", "status": exc.status, "headers": exc.raw_headers(request_id)}
        )
        await send({"type": "http.response.body", "body": exc.body(), "more_body": False})
