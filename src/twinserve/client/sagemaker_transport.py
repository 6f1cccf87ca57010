"""`SageMakerTransport`: `LLMClient` over SageMaker Runtime (a real endpoint, or the local gateway).

`LLMClient(transport=SageMakerTransport("twin"), api="openai")` is the whole change for a
caller that used to give a URL. SageMaker has one route, `/invocations`, and the body's shape
picks the protocol there (as in the HF LLM DLC, and in our server's `/invocations`):
- `/generate`, `/generate_stream`: TGI's `{"inputs", "parameters"}`; `return_full_text`
  defaults to false as on TGI's `/generate` (it defaults to true on `/invocations`), and the
  one-element list `/invocations` answers with is unwrapped.
- `/v1/chat/completions`: the chat body (`messages`), which the DLC takes with
  MESSAGES_API_ENABLED; `/v1/completions`: the `prompt` body (our server only, not the DLC).
`send` is `InvokeEndpoint`; `stream` is `InvokeEndpointWithResponseStream` with
`"stream": true`, its `PayloadPart`s re-assembled into SSE events (`_sse.SSEDecoder`), so the
client parses the same `data:` strings as over HTTP.

Nothing else of the server is reachable through SageMaker Runtime: `get` (`/info`, `/health`)
and a `send` to a route with no `/invocations` body (`/tokenize`, `/chat_tokenize`) raise
`NotFoundError` before any call, the error a server without the route answers with, so a
caller that can do without (the RAG service: limits from its settings, a local tokenizer)
has one error to catch, and it is never retried. (A request id is not sent either: the runtime
API takes no headers of ours.)

Asynchronous invocations: `submit_job` is `InvokeEndpointAsync` (the body inline, or uploaded
first to `async_input_location`), `job_status`/`job_output` look at the output and failure
objects in S3 (SageMaker has no status API; see `_sagemaker_async`).

Errors come back as `Response`s when they are answers, so `LLMClient` maps them as it does
for HTTP: a `ModelError` (the container answered 4xx/5xx) becomes that status with the
container's body, a missing endpoint a 404, throttling a 429, `ModelNotReadyException` and
`ServiceUnavailable` a 503 (both retried), a refused signature a 401. Failures of the call
itself raise: `UnreachableError` (no connection), `RequestTimeoutError` (read timeout).

The boto3 client is made once, with botocore's retries off: `LLMClient` owns the retry
policy, and two layers of retries multiply. Credentials stay in boto3 (its usual chain, or
the `session`/`client` given); nothing here logs or prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

try:
    import boto3
    from botocore.config import Config
except ImportError as exc:  # pragma: no cover - exercised only without the [aws] extra
    raise ImportError("SageMakerTransport needs boto3: pip install 'twinserve[aws]'") from exc

from twinserve.client import _sagemaker_async, _wire
from twinserve.client._sagemaker_errors import ClientError, error_response, stream_error, translated
from twinserve.client._sse import SSEDecoder
from twinserve.client._threads import ThreadPump
from twinserve.client.transport import AsyncRef, AsyncRequest, AsyncStreamResponse, Response, StreamResponse
from twinserve.errors import NotFoundError

_JSON = "application/json"
_LOCAL_REGION = "us-east-1"  # any region signs for the local gateway; botocore insists on one
T = TypeVar("T")


class SageMakerTransport:
    """One SageMaker endpoint, through `sagemaker-runtime`.

    `client` is a ready boto3 `sagemaker-runtime` client (then `region`, `endpoint_url`,
    `session` and the timeouts are its business); otherwise one is made from `session` (default:
    boto3's default chain) with `region`, `endpoint_url` (the local gateway's URL, say),
    `timeout` seconds to wait for a byte and `connect_timeout`. `target_variant` and
    `custom_attributes` go with every call (TargetVariant, CustomAttributes).

    The async methods run boto3's blocking calls in a pool of `max_pool_connections` threads
    of their own (the default executor has a handful, and would queue concurrent calls).

    Async invocations: `async_input_location="s3://bucket/prefix"` uploads each body there and
    sends its location (SageMaker's usual way, any size); without it the body goes inline
    (`Body`, at most 128,000 bytes). Results are read with `s3_client` (default: one from the
    same session), or from disk for the `file://` locations of a local endpoint.
    """

    def __init__(
        self,
        endpoint_name: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: Any = None,
        session: Any = None,
        timeout: float | None = 120.0,
        connect_timeout: float = 10.0,
        target_variant: str | None = None,
        custom_attributes: str | None = None,
        max_pool_connections: int = 64,
        async_input_location: str | None = None,
        s3_client: Any = None,
    ) -> None:
        self.endpoint_name = endpoint_name
        self.endpoint_url = endpoint_url
        self._extra: dict[str, str] = {}
        if target_variant is not None:
            self._extra["TargetVariant"] = target_variant
        if custom_attributes is not None:
            self._extra["CustomAttributes"] = custom_attributes
        self._owns_client = client is None  # a client given may be shared: not ours to close
        self._client = client or _make_client(
            session, region, endpoint_url, timeout, connect_timeout, max_pool_connections
        )
        self._threads = max_pool_connections
        self._pool: ThreadPoolExecutor | None = None
        self.region = region or getattr(self._client.meta, "region_name", None)
        self._session = session
        self._s3_client = s3_client
        self._owns_s3 = s3_client is None
        self._jobs = _sagemaker_async.SageMakerJobs(async_input_location, self._s3)

    def __repr__(self) -> str:
        # never the credentials: only where the calls go
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"SageMakerTransport({self.endpoint_name!r}, region={self.region!r}{where})"

    # ---------------------------------------------------------------- sync
    def send(self, path: str, payload: Mapping[str, Any]) -> Response:
        self._check_invocable(path)
        body = _wire.invocations_body(path, payload, stream=False)
        with translated(self._where(path)):
            try:
                out = self._client.invoke_endpoint(
                    EndpointName=self.endpoint_name, Body=body, ContentType=_JSON, Accept=_JSON, **self._extra
                )
            except ClientError as exc:
                return error_response(exc)
            data = out["Body"].read()
        return Response(200, _headers(out), _wire.unwrapped(path, data))

    @contextlib.contextmanager
    def stream(self, path: str, payload: Mapping[str, Any]) -> Iterator[StreamResponse]:
        opened = self._open_stream(path, payload)
        if isinstance(opened, Response):
            yield StreamResponse(opened.status, opened.headers, body=opened.body)
            return
        headers, event_stream = opened
        events = self._events(event_stream, path)
        try:
            yield StreamResponse(200, headers, events=events)
        finally:
            events.close()  # a caller that stopped early leaves it suspended
            event_stream.close()  # and the connection goes: the container aborts the generation

    def _open_stream(self, path: str, payload: Mapping[str, Any]) -> Response | tuple[dict[str, str], Any]:
        """The response headers and botocore's EventStream, or the error answer."""
        self._check_invocable(path)
        body = _wire.invocations_body(path, payload, stream=True)
        with translated(self._where(path)):
            try:
                out = self._client.invoke_endpoint_with_response_stream(
                    EndpointName=self.endpoint_name,
                    Body=body,
                    ContentType=_JSON,
                    Accept="text/event-stream",
                    **self._extra,
                )
            except ClientError as exc:
                return error_response(exc)
        return _headers(out), out["Body"]

    def _events(self, event_stream: Any, path: str) -> Generator[str, None, None]:
        decoder = SSEDecoder()
        # translated here too: the generator runs after `stream()` has returned it
        with translated(self._where(path)):
            try:
                for event in event_stream:
                    part = event.get("PayloadPart")
                    if part is not None:
                        yield from decoder.feed(part.get("Bytes", b""))
            except ClientError as exc:  # EventStreamError: ModelStreamError, InternalStreamFailure
                raise stream_error(exc) from exc
            yield from decoder.end()

    def get(self, path: str) -> Response:
        raise self._unreachable(path)

    def _check_invocable(self, path: str) -> None:
        if path not in _wire.INVOCATION_PATHS:
            raise self._unreachable(path)

    def _unreachable(self, path: str) -> NotFoundError:
        return NotFoundError(
            f"{path} cannot be reached through SageMaker Runtime, which invokes only an endpoint's "
            f"/invocations (here {self.endpoint_name!r}); ask the model server over HTTP for it"
        )

    def submit_job(self, request: AsyncRequest) -> Response:
        operation = self._client.meta.service_model.operation_model("InvokeEndpointAsync")
        inline = "Body" in operation.input_shape.members
        with translated(self._where("InvokeEndpointAsync")):
            try:
                args = self._jobs.invoke_args(request, inline_body=inline)
                if "CustomAttributes" in self._extra:  # TargetVariant: not an async parameter
                    args["CustomAttributes"] = self._extra["CustomAttributes"]
                out = self._client.invoke_endpoint_async(EndpointName=self.endpoint_name, **args)
            except ClientError as exc:
                return error_response(exc)
        answer = _sagemaker_async.accepted(out)
        return Response(answer.status, {**_headers(out), **answer.headers}, answer.body)

    def job_status(self, ref: AsyncRef) -> Response:
        with translated(self._where(f"status of {ref.inference_id}")):
            try:
                return _sagemaker_async.status(ref, self._jobs.find(ref))
            except ClientError as exc:
                return error_response(exc)

    def job_output(self, ref: AsyncRef) -> Response:
        with translated(self._where(f"output of {ref.inference_id}")):
            try:
                found = self._jobs.find(ref)
                return _sagemaker_async.not_finished(ref) if found is None else self._jobs.read(found)
            except ClientError as exc:
                return error_response(exc)

    def _s3(self) -> Any:
        if self._s3_client is None:
            session = self._session or boto3.session.Session()
            self._s3_client = session.client("s3", region_name=self.region)
        return self._s3_client

    def close(self) -> None:
        """Close the connections of boto3 clients made here (they reconnect if used again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._owns_client:
            self._client.close()
        if self._owns_s3 and self._s3_client is not None:
            self._s3_client.close()

    # --------------------------------------------------------------- async
    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="sagemaker-runtime")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def asend(self, path: str, payload: Mapping[str, Any]) -> Response:
        self._check_invocable(path)
        return await self._in_thread(self.send, path, payload)

    async def aget(self, path: str) -> Response:
        raise self._unreachable(path)

    @contextlib.asynccontextmanager
    async def astream(self, path: str, payload: Mapping[str, Any]) -> AsyncIterator[AsyncStreamResponse]:
        self._check_invocable(path)
        opened = await self._in_thread(self._open_stream, path, payload)
        if isinstance(opened, Response):
            yield AsyncStreamResponse(opened.status, opened.headers, body=opened.body)
            return
        headers, event_stream = opened
        # botocore reads blocking: a thread iterates the stream and feeds the event loop
        pump = ThreadPump(self._events(event_stream, path), on_stop=event_stream.close)
        try:
            yield AsyncStreamResponse(200, headers, events=pump.events)
        finally:
            await pump.aclose()

    async def asubmit_job(self, request: AsyncRequest) -> Response:
        return await self._in_thread(self.submit_job, request)

    async def ajob_status(self, ref: AsyncRef) -> Response:
        return await self._in_thread(self.job_status, ref)

    async def ajob_output(self, ref: AsyncRef) -> Response:
        return await self._in_thread(self.job_output, ref)

    async def aclose(self) -> None:
        self.close()

    def _where(self, path: str) -> str:
        return f"SageMaker endpoint {self.endpoint_name!r} ({path})"


def _make_client(
    session: Any,
    region: str | None,
    endpoint_url: str | None,
    timeout: float | None,
    connect_timeout: float,
    max_pool_connections: int,
) -> Any:
    session = session or boto3.session.Session()
    if region is None and endpoint_url is not None and session.region_name is None:
        region = _LOCAL_REGION
    config = Config(
        retries={"total_max_attempts": 1},  # LLMClient retries; botocore must not as well
        connect_timeout=connect_timeout,
        read_timeout=timeout,  # None: no limit
        max_pool_connections=max_pool_connections,
    )
    return session.client("sagemaker-runtime", region_name=region, endpoint_url=endpoint_url, config=config)


def _headers(out: Mapping[str, Any]) -> dict[str, str]:
    meta = out.get("ResponseMetadata", {})
    headers = {k.lower(): v for k, v in meta.get("HTTPHeaders", {}).items()}
    if "x-request-id" not in headers and meta.get("RequestId"):
        headers["x-request-id"] = meta["RequestId"]  # SageMaker's id, for the caller's logs
    return headers
