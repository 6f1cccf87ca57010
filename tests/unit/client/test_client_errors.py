"""Typed errors and retries against real servers (and a closed port).

Retry counts are observed with `CountingTransport`, which wraps the real HttpTransport
and records the status of each attempt; nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ThreadServer, free_port, serve_config, thread_server
from twinserve.client import AsyncStreamResponse, HttpTransport, LLMClient, Response, StreamResponse
from twinserve.errors import (
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    TwinserveError,
    UnauthorizedError,
    UnreachableError,
    ValidationError,
)

FAST: dict[str, Any] = {"backoff_base": 0.001, "backoff_cap": 0.001}  # also caps the server's Retry-After


class CountingTransport:
    """The real HttpTransport, recording the status of every attempt (-1: no answer)."""

    def __init__(self, inner: HttpTransport) -> None:
        self.inner = inner
        self.statuses: list[int] = []

    def send(self, path: str, payload: Mapping[str, Any]) -> Response:
        try:
            response = self.inner.send(path, payload)
        except TwinserveError:  # no answer: unreachable, timed out
            self.statuses.append(-1)
            raise
        self.statuses.append(response.status)
        return response

    @contextlib.contextmanager
    def stream(self, path: str, payload: Mapping[str, Any]) -> Iterator[StreamResponse]:
        answered = False
        try:
            with self.inner.stream(path, payload) as response:
                answered = True
                self.statuses.append(response.status)
                yield response
        except TwinserveError:
            if not answered:  # unreachable, timed out
                self.statuses.append(-1)
            raise

    async def asend(self, path: str, payload: Mapping[str, Any]) -> Response:
        try:
            response = await self.inner.asend(path, payload)
        except TwinserveError:  # no answer: unreachable, timed out
            self.statuses.append(-1)
            raise
        self.statuses.append(response.status)
        return response

    @contextlib.asynccontextmanager
    async def astream(self, path: str, payload: Mapping[str, Any]) -> AsyncIterator[AsyncStreamResponse]:
        answered = False
        try:
            async with self.inner.astream(path, payload) as response:
                answered = True
                self.statuses.append(response.status)
                yield response
        except TwinserveError:
            if not answered:
                self.statuses.append(-1)
            raise

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ThreadServer]:
    with thread_server(serve_config(model_dir)) as s:
        yield s


def counting_client(
    url: str, api: str = "tgi", api_key: str | None = None, timeout: float = 120.0, **kw: Any
) -> tuple[LLMClient, CountingTransport]:
    transport = CountingTransport(HttpTransport(url, api_key=api_key, timeout=timeout))
    return LLMClient(transport=transport, api=api, **kw), transport


# ---------------------------------------------------------- 422 / 400
@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_bad_parameter_is_a_validation_error_and_not_retried(server: ThreadServer, api: str) -> None:
    client, counted = counting_client(server.url, api, max_retries=3, **FAST)
    with client, pytest.raises(ValidationError) as info:
        client.generate("hello", top_p=3.0)
    status = 422 if api == "tgi" else 400  # OpenAI's and vLLM's status for a bad request
    assert info.value.status_code == status
    assert "top_p" in info.value.message
    assert any(note.startswith("request_id: ") for note in info.value.__notes__)
    assert counted.statuses == [status]


@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_bad_parameter_in_a_stream_raises_before_any_chunk(server: ThreadServer, api: str) -> None:
    client, counted = counting_client(server.url, api, max_retries=3, **FAST)
    with client, pytest.raises(ValidationError, match="max_new_tokens|maximum context length"):
        list(client.chat_stream([{"role": "user", "content": "hi"}], max_new_tokens=10_000))
    assert counted.statuses == [400]  # chat goes to the OpenAI route whatever the client's api


def test_unknown_parameter_passes_through_to_the_server(server: ThreadServer) -> None:
    # the client sends what it is given; the server decides: TGI ignores unknown parameters,
    # our OpenAI routes refuse the known ones they don't implement
    with LLMClient(server.url, api="tgi") as client:
        assert client.generate("hello", no_such_param=1, max_new_tokens=2).generated_tokens <= 2
    with (
        LLMClient(server.url, api="openai") as client,
        pytest.raises(ValidationError, match="use_beam_search"),
    ):
        client.generate("hello", use_beam_search=True)


# ---------------------------------------------------------------- 401
def test_api_key(model_dir: Path) -> None:
    secret = "k-not-in-any-message"
    with thread_server(serve_config(model_dir, api_key=secret)) as s:
        for api in ("tgi", "openai"):
            with LLMClient(s.url, api=api, max_retries=3, **FAST) as anonymous:
                with pytest.raises(UnauthorizedError) as info:
                    anonymous.generate("hello", max_new_tokens=1)
                assert info.value.status_code == 401
                with pytest.raises(UnauthorizedError):
                    list(anonymous.chat_stream([{"role": "user", "content": "hi"}], max_new_tokens=1))
            wrong_key = "wrong-key-123"
            wrong = LLMClient(s.url, api=api, api_key=wrong_key)
            with wrong, pytest.raises(UnauthorizedError) as info:
                wrong.generate("hello", max_new_tokens=1)
            assert wrong_key not in str(info.value) and wrong_key not in repr(info.value)
            assert wrong_key not in repr(wrong) and wrong_key not in str(wrong)
            with LLMClient(s.url, api=api, api_key=secret) as authorized:
                assert authorized.generate("hello", max_new_tokens=1).generated_tokens == 1
                assert list(authorized.generate_stream("hello", max_new_tokens=1))[-1].finished
                assert secret not in repr(authorized)
                assert secret not in repr(authorized._transport)


# ---------------------------------------------------------- 404 / 413
@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_an_unknown_route_is_not_found_and_not_retried(server: ThreadServer, api: str) -> None:
    """A base URL with a wrong path (a typo, a missing proxy prefix) reaches routes the server
    does not have: NotFoundError at once, for unary calls and streams alike."""
    client, counted = counting_client(f"{server.url}/no-such-prefix", api, max_retries=3, **FAST)
    with client:
        with pytest.raises(NotFoundError) as info:
            client.generate("hello", max_new_tokens=2)
        assert info.value.status_code == 404 and "/no-such-prefix" in info.value.message
        with pytest.raises(NotFoundError):
            list(client.generate_stream("hello", max_new_tokens=2))
    assert counted.statuses == [404, 404]


@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_a_body_over_the_payload_limit_is_payload_too_large_and_not_retried(
    server: ThreadServer, api: str
) -> None:
    """Re-sending the same too-big body cannot succeed: PayloadTooLargeError after one attempt."""
    prompt = "x" * (server.config.payload_limit + 1)
    client, counted = counting_client(server.url, api, max_retries=3, **FAST)
    with client:
        with pytest.raises(PayloadTooLargeError) as info:
            client.generate(prompt, max_new_tokens=2)
        assert info.value.status_code == 413 and "payload limit" in info.value.message
        with pytest.raises(PayloadTooLargeError):
            list(client.chat_stream([{"role": "user", "content": prompt}], max_new_tokens=2))
    assert counted.statuses == [413, 413]


# ---------------------------------------------------------------- 429
LONG = {"max_new_tokens": 480, "ignore_eos": True}


def test_overloaded_is_retried_then_raised_and_succeeds_once_capacity_frees(model_dir: Path) -> None:
    cfg = serve_config(
        model_dir, max_concurrent_requests=1, max_total_tokens=512, max_batch_total_tokens=8192
    )
    with thread_server(cfg) as s:

        async def main() -> tuple[list[int], list[int]]:
            async with LLMClient(s.url, max_retries=0) as holder_client:
                holder = holder_client.agenerate_stream("hello", **LONG)
                await anext(holder)  # admitted and generating: the one slot is taken
                # 1) retries run out while the slot stays taken
                client, exhausted = counting_client(s.url, max_retries=2, **FAST)
                async with client:
                    with pytest.raises(OverloadedError) as info:
                        await client.agenerate("hi", max_new_tokens=2)
                assert "overloaded" in info.value.message.lower()
                # 2) a patient client keeps retrying; closing the holder frees the slot
                client, patient = counting_client(
                    s.url, max_retries=10_000, backoff_base=0.005, backoff_cap=0.02
                )
                async with client:
                    task = asyncio.ensure_future(client.agenerate("hi", max_new_tokens=2, ignore_eos=True))
                    while 429 not in patient.statuses and not task.done():
                        await asyncio.sleep(0.005)
                    await holder.aclose()  # client disconnect: the server aborts the request
                    result = await asyncio.wait_for(task, 120)
                assert result.generated_tokens == 2
            return exhausted.statuses, patient.statuses

        exhausted, patient = asyncio.run(main())
    assert exhausted == [429, 429, 429]
    assert patient[0] == 429 and patient[-1] == 200
    assert set(patient[:-1]) == {429}


def test_overloaded_stream_is_retried_before_its_first_chunk(model_dir: Path) -> None:
    cfg = serve_config(
        model_dir, max_concurrent_requests=1, max_total_tokens=512, max_batch_total_tokens=8192
    )
    with thread_server(cfg) as s, LLMClient(s.url, max_retries=0) as holder_client:
        holder = holder_client.generate_stream("hello", **LONG)
        next(holder)
        client, counted = counting_client(s.url, max_retries=1, **FAST)
        with client, pytest.raises(OverloadedError):
            list(client.generate_stream("hi", max_new_tokens=2))
        holder.close()
    assert counted.statuses == [429, 429]


# ---------------------------------------------------------------- timeout
def test_read_timeout_is_not_retried(model_dir: Path) -> None:
    cfg = serve_config(model_dir, max_total_tokens=512, max_batch_total_tokens=8192)
    with thread_server(cfg) as s:
        client, counted = counting_client(s.url, timeout=0.01, max_retries=3, **FAST)
        with client, pytest.raises(RequestTimeoutError) as info:
            client.generate("hello", **LONG)  # a unary answer sends no byte before it is done
    assert info.value.status_code == 504
    assert counted.statuses == [-1]


# ---------------------------------------------------------------- unreachable
def test_closed_port_is_unreachable_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client, counted = counting_client(url, max_retries=2, **FAST)
    with client, pytest.raises(UnreachableError) as info:
        client.generate("hello")
    assert info.value.status_code == 503
    assert url in info.value.message
    assert counted.statuses == [-1, -1, -1]

    with client, pytest.raises(UnreachableError):
        list(client.chat_stream([{"role": "user", "content": "hi"}]))
    assert counted.statuses == [-1] * 6

    async def main() -> None:
        async with LLMClient(url, api="openai", max_retries=1, **FAST) as aclient:
            with pytest.raises(UnreachableError):
                await aclient.agenerate("hello")
            with pytest.raises(UnreachableError):
                async for _ in aclient.agenerate_stream("hello"):
                    pass

    asyncio.run(main())


def test_api_key_never_in_repr_or_unreachable_error() -> None:
    secret = "sk-very-secret"
    url = f"http://127.0.0.1:{free_port()}"
    client = LLMClient(url, api_key=secret, max_retries=0)
    with client, pytest.raises(UnreachableError) as info:
        client.generate("hello")
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert secret not in repr(client) and secret not in str(client)
    assert "api_key=***" in repr(HttpTransport(url, api_key=secret))
    assert secret not in repr(HttpTransport(url, api_key=secret))
