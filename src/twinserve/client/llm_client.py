"""`LLMClient`: the one way callers reach an LLM endpoint, TGI- or OpenAI-shaped.

One request is one `_Call` (path, body, how to read the answer); the four loops below
(sync/async × unary/stream) only add retries around a transport; the unary ones also carry
the asynchronous invocations (`submit_async`, and the polls of `async_jobs.AsyncInvocation`). Retries follow
`RetryPolicy` and never happen once a stream has handed out a chunk: the caller has
already seen text that a second attempt might not reproduce. The calls about the server
(`info`, `tokenize`, `chat_tokenize`, `health`) are `_ops.ServerCalls`, over the same loops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from twinserve.client import _wire
from twinserve.client._errors import error_from_response
from twinserve.client._ops import ServerCalls
from twinserve.client._retry import RetryPolicy, retry_after
from twinserve.client._stream import OpenAIStreamParser, StreamParser, TgiStreamParser
from twinserve.client.async_jobs import AsyncInvocation, AsyncStatus, read_status
from twinserve.client.transport import AsyncRequest, HttpTransport, Response, Transport
from twinserve.client.types import Api, GenerationResult, StreamChunk
from twinserve.errors import TwinserveError

log = logging.getLogger(__name__)

Messages = _wire.Messages

T = TypeVar("T")
_ASYNC = "/async-invocations"

DEFAULT_TIMEOUT = 120.0  # seconds without a byte from the server (a whole unary answer, or a chunk)


@dataclass(frozen=True)
class _Call:
    path: str
    body: dict[str, Any]
    result: Callable[[Response, str | None], GenerationResult]
    parser: Callable[[str | None], StreamParser]


class LLMClient(ServerCalls):
    """Generate and chat against one endpoint, sync or async, whole or streamed; and ask it
    what it serves (`info`), how it tokenizes (`tokenize`, `chat_tokenize`) and whether it
    serves now (`health`), the calls of `_ops.ServerCalls`.

    `api="tgi"`: `generate*` use `/generate` and `/generate_stream`; `api="openai"`:
    `/v1/completions`. `chat*` always use `/v1/chat/completions` (TGI serves it too).
    Parameters use TGI's names (`max_new_tokens`, `temperature`, `top_p`, `top_k`,
    `repetition_penalty`, `frequency_penalty`, `seed`, `stop`, `do_sample`, `details`,
    `top_n_tokens`, …) and are translated for OpenAI; others (`ignore_eos`) pass through.
    Keyword arguments the constructor does not know become default parameters.

    Errors are twinserve's (`ValidationError`, `OverloadedError`, `UnauthorizedError`,
    `UnreachableError`, …) with the server's message. 429, 503 and failed connections
    are retried `max_retries` times, waiting `backoff_base * 2**n` seconds with full
    jitter, at least the server's `Retry-After`, at most `backoff_cap`.

    Give either `base_url` (an `HttpTransport` is built with `api_key` and `timeout`,
    default 120 s without a byte) or a ready `transport`, which then owns credentials and
    timeouts (passing `api_key` or `timeout` as well is an error, not silently ignored).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api: Api = "tgi",
        api_key: str | None = None,
        timeout: float | None = None,
        max_retries: int = 3,
        backoff_base: float = 0.25,
        backoff_cap: float = 8.0,
        transport: Transport | None = None,
        model: str | None = None,
        **defaults: Any,
    ) -> None:
        if api not in ("tgi", "openai"):
            raise ValueError(f"api must be 'tgi' or 'openai', not {api!r}")
        if (base_url is None) == (transport is None):
            raise ValueError("give exactly one of base_url and transport")
        if transport is not None and (api_key is not None or timeout is not None):
            raise ValueError("with a custom transport, give the API key and timeout to the transport")
        self.api: Api = api
        self.model = model
        self.defaults: dict[str, Any] = dict(defaults)
        self.retry = RetryPolicy(max_retries, backoff_base, backoff_cap)
        self._label = base_url or repr(transport)
        self._transport: Transport = transport or HttpTransport(
            base_url or "", api_key=api_key, timeout=DEFAULT_TIMEOUT if timeout is None else timeout
        )

    def __repr__(self) -> str:
        model = f", model={self.model!r}" if self.model else ""
        return f"LLMClient({self._label!r}, api={self.api!r}{model})"

    # ------------------------------------------------------------- calls
    def _generate_call(self, prompt: str, params: Mapping[str, Any], *, stream: bool) -> _Call:
        values = _wire.merged(self.defaults, params)
        if self.api == "tgi":
            return _Call(
                _wire.TGI_STREAM if stream else _wire.TGI_GENERATE,
                _wire.tgi_body(prompt, values),
                _wire.tgi_result,
                TgiStreamParser,
            )
        return self._openai_call("completion", prompt, values, stream=stream)

    def _chat_call(self, messages: Messages, params: Mapping[str, Any], *, stream: bool) -> _Call:
        values = _wire.merged(self.defaults, params)
        return self._openai_call("chat", messages, values, stream=stream)

    def _openai_call(
        self, kind: _wire.OpenAIKind, content: str | Messages, values: dict[str, Any], *, stream: bool
    ) -> _Call:
        # TGI's chat route wanted a `model` until 2.x; "tgi" is what its own docs send
        model = self.model or ("tgi" if self.api == "tgi" else None)
        return _Call(
            _wire.OPENAI_CHAT if kind == "chat" else _wire.OPENAI_COMPLETION,
            _wire.openai_body(kind, content, values, model=model, stream=stream),
            lambda response, rid: _wire.openai_result(kind, response, rid),
            lambda rid: OpenAIStreamParser(kind, rid),
        )

    # ---------------------------------------------------------- sync API
    def generate(self, prompt: str, **params: Any) -> GenerationResult:
        """Continue `prompt`; the whole answer at once."""
        return self._send(self._generate_call(prompt, params, stream=False))

    def generate_stream(self, prompt: str, **params: Any) -> Generator[StreamChunk, None, None]:
        """Continue `prompt`, chunk by chunk; the last chunk has `finished=True`."""
        return self._stream(self._generate_call(prompt, params, stream=True))

    def chat(self, messages: Messages, **params: Any) -> GenerationResult:
        """Answer a conversation (`[{"role": "user", "content": "…"}, …]`) with the model's template."""
        return self._send(self._chat_call(messages, params, stream=False))

    def chat_stream(self, messages: Messages, **params: Any) -> Generator[StreamChunk, None, None]:
        return self._stream(self._chat_call(messages, params, stream=True))

    def submit_async(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        body: Mapping[str, Any] | None = None,
        input_location: str | None = None,
        inference_id: str | None = None,
        request_ttl_s: int | None = None,
        invocation_timeout_s: int | None = None,
        **params: Any,
    ) -> AsyncInvocation:
        """Queue a request on an async endpoint; returns at once (the endpoint answered 202).

        Give one of: `prompt` (the body `generate` would send), `messages` (`chat`'s), `body`
        (an `/invocations` body as it is: TGI's `inputs`, `messages` or `prompt`) or
        `input_location` (`s3://…` or `file://…`, where such a body already is). `params` are
        `generate`'s and `chat`'s parameters, with the client's defaults. `inference_id`
        (default: a new one, so a retried submit is still one job), `request_ttl_s` and
        `invocation_timeout_s` are SageMaker's InferenceId, RequestTTLSeconds and
        InvocationTimeoutSeconds. `.result()` on what it returns waits for the answer.
        """
        request, path = self._async_request(
            prompt,
            messages,
            body,
            input_location,
            params,
            inference_id=inference_id,
            request_ttl_s=request_ttl_s,
            invocation_timeout_s=invocation_timeout_s,
        )
        accepted = self._unary(_ASYNC, lambda: self._transport.submit_job(request), read_status)
        return self._invocation(accepted, path)

    def _async_request(
        self,
        prompt: str | None,
        messages: Messages | None,
        body: Mapping[str, Any] | None,
        input_location: str | None,
        params: Mapping[str, Any],
        **options: Any,
    ) -> tuple[AsyncRequest, str | None]:
        """The job to queue, and the route its body was built for (None: the caller's own body,
        whose answer is read by its shape). `options`: AsyncRequest's id, TTL and timeout."""
        given = {"prompt": prompt, "messages": messages, "body": body, "input_location": input_location}
        named = [name for name, value in given.items() if value is not None]
        if len(named) != 1:
            raise ValueError(f"give exactly one of {', '.join(given)}, not {named}")
        if params and (body is not None or input_location is not None):
            raise ValueError(f"with {named[0]}, the parameters are in the body: not {sorted(params)}")
        call: _Call | None = None
        if prompt is not None:
            call = self._generate_call(prompt, params, stream=False)
        elif messages is not None:
            call = self._chat_call(messages, params, stream=False)
        if call is not None:  # the body the synchronous call sends, as /invocations takes it
            data: bytes | None = _wire.invocations_body(call.path, call.body, stream=False)
        else:
            data = None if body is None else json.dumps(dict(body)).encode()
        options["inference_id"] = options.get("inference_id") or uuid.uuid4().hex
        request = AsyncRequest(body=data, input_location=input_location, **options)
        return request, call.path if call is not None else None

    def _invocation(self, accepted: AsyncStatus, path: str | None) -> AsyncInvocation:
        return AsyncInvocation(
            accepted.inference_id, accepted.output_location, accepted.failure_location, self, path
        )

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: _Call) -> GenerationResult:
        return self._unary(call.path, lambda: self._transport.send(call.path, call.body), call.result)

    def _unary(
        self, what: str, request: Callable[[], Response], read: Callable[[Response, str | None], T]
    ) -> T:
        """`request()` until it answers 2xx (then `read` it) or fails for good; `what` names it in logs."""
        attempt = 0
        while True:
            hint: float | None = None
            try:
                response = request()
                rid = response.headers.get("x-request-id")
                if not 200 <= response.status < 300:
                    hint = retry_after(response.headers)
                    raise error_from_response(response.status, response.body, rid)
            except TwinserveError as exc:
                if not self.retry.should_retry(exc, attempt):
                    raise
                delay = self._delay(what, exc, attempt, hint)
            else:  # outside the retries: an answer that reads as an error (a failed job's) stays one
                return read(response, rid)
            time.sleep(delay)
            attempt += 1

    def _stream(self, call: _Call) -> Generator[StreamChunk, None, None]:
        attempt = 0
        while True:
            hint: float | None = None
            yielded = False
            try:
                with self._transport.stream(call.path, call.body) as response:
                    rid = response.headers.get("x-request-id")
                    if not 200 <= response.status < 300:
                        hint = retry_after(response.headers)
                        raise error_from_response(response.status, response.body, rid)
                    parser = call.parser(rid)
                    for data in response.events:
                        chunk = parser.feed(data)
                        if chunk is not None:
                            yielded = True
                            yield chunk
                    last = parser.end()
                    if last is not None:
                        yield last
                    return
            except TwinserveError as exc:
                if yielded or not self.retry.should_retry(exc, attempt):
                    raise
                delay = self._delay(call.path, exc, attempt, hint)
            time.sleep(delay)
            attempt += 1

    def _delay(self, what: str, exc: TwinserveError, attempt: int, hint: float | None) -> float:
        """Seconds to wait before the next attempt (logged: retries hide trouble otherwise)."""
        delay = self.retry.delay(attempt, hint)
        log.info(
            "retrying %s after %s (%d/%d) in %.2fs",
            what,
            type(exc).__name__,
            attempt + 1,
            self.retry.max_retries,
            delay,
        )
        return delay

    # --------------------------------------------------------- async API
    async def agenerate(self, prompt: str, **params: Any) -> GenerationResult:
        return await self._asend(self._generate_call(prompt, params, stream=False))

    def agenerate_stream(self, prompt: str, **params: Any) -> AsyncGenerator[StreamChunk, None]:
        """Async chunks; wrap in `contextlib.aclosing` to stop early and free the connection."""
        return self._astream(self._generate_call(prompt, params, stream=True))

    async def achat(self, messages: Messages, **params: Any) -> GenerationResult:
        return await self._asend(self._chat_call(messages, params, stream=False))

    def achat_stream(self, messages: Messages, **params: Any) -> AsyncGenerator[StreamChunk, None]:
        return self._astream(self._chat_call(messages, params, stream=True))

    async def asubmit_async(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        body: Mapping[str, Any] | None = None,
        input_location: str | None = None,
        inference_id: str | None = None,
        request_ttl_s: int | None = None,
        invocation_timeout_s: int | None = None,
        **params: Any,
    ) -> AsyncInvocation:
        """`submit_async` for asyncio; use `astatus()`/`aresult()` on what it returns."""
        request, path = self._async_request(
            prompt,
            messages,
            body,
            input_location,
            params,
            inference_id=inference_id,
            request_ttl_s=request_ttl_s,
            invocation_timeout_s=invocation_timeout_s,
        )
        accepted = await self._aunary(_ASYNC, lambda: self._transport.asubmit_job(request), read_status)
        return self._invocation(accepted, path)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _asend(self, call: _Call) -> GenerationResult:
        return await self._aunary(call.path, lambda: self._transport.asend(call.path, call.body), call.result)

    async def _aunary(
        self, what: str, request: Callable[[], Awaitable[Response]], read: Callable[[Response, str | None], T]
    ) -> T:
        attempt = 0
        while True:
            hint: float | None = None
            try:
                response = await request()
                rid = response.headers.get("x-request-id")
                if not 200 <= response.status < 300:
                    hint = retry_after(response.headers)
                    raise error_from_response(response.status, response.body, rid)
            except TwinserveError as exc:
                if not self.retry.should_retry(exc, attempt):
                    raise
                delay = self._delay(what, exc, attempt, hint)
            else:  # outside the retries: an answer that reads as an error (a failed job's) stays one
                return read(response, rid)
            await asyncio.sleep(delay)
            attempt += 1

    async def _astream(self, call: _Call) -> AsyncGenerator[StreamChunk, None]:
        attempt = 0
        while True:
            hint: float | None = None
            yielded = False
            try:
                async with self._transport.astream(call.path, call.body) as response:
                    rid = response.headers.get("x-request-id")
                    if not 200 <= response.status < 300:
                        hint = retry_after(response.headers)
                        raise error_from_response(response.status, response.body, rid)
                    parser = call.parser(rid)
                    async for data in response.events:
                        chunk = parser.feed(data)
                        if chunk is not None:
                            yielded = True
                            yield chunk
                    last = parser.end()
                    if last is not None:
                        yield last
                    return
            except TwinserveError as exc:
                if yielded or not self.retry.should_retry(exc, attempt):
                    raise
                delay = self._delay(call.path, exc, attempt, hint)
            await asyncio.sleep(delay)
            attempt += 1
