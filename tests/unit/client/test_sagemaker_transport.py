"""`SageMakerTransport` under `LLMClient`, through the local SageMaker Runtime gateway.

Real parts throughout: a tiny-model server in a thread, a state store naming it, the gateway
under uvicorn, and boto3's own client inside the transport. With greedy decoding and
`ignore_eos`, the answers must equal those `HttpTransport` gets from the server directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from httpx_sse import EventSource

from tests.servers import ThreadServer, asgi_in_thread, serve_config, thread_server, until
from twinserve.client import LLMClient, SageMakerTransport, StreamChunk
from twinserve.client._sse import SSEDecoder
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus, ReplicaRecord, ReplicaState
from twinserve.deploy.state import StateStore
from twinserve.errors import (
    BadGatewayError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnauthorizedError,
    UnreachableError,
    ValidationError,
)
from twinserve.platforms.local.gateway.app import create_gateway_app
from twinserve.server.process import free_port

K = 5
KEY = "transport-test-key"
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "hello there"}]


# ---------------------------------------------------------------- fixtures
async def _breaks_mid_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
    raise RuntimeError("container died")


def _put(store: StateStore, name: str, url: str, **config: Any) -> None:
    cfg = EndpointConfig.model_validate({"name": name, "variants": [{"model": "tiny"}], **config})
    store.put_endpoint(Endpoint.new(cfg).model_copy(update={"status": EndpointStatus.IN_SERVICE, "url": url}))
    port = int(url.rsplit(":", 1)[1])
    replica = ReplicaRecord(id=f"{name}-1", endpoint=name, variant="primary", port=port, url=url)
    store.put_replica(replica.model_copy(update={"state": ReplicaState.HEALTHY}))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ThreadServer]:
    # room for a long generation, to see an early stop abort it
    with thread_server(serve_config(model_dir, max_total_tokens=4000, max_batch_total_tokens=20000)) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(server: ThreadServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = StateStore(tmp_path_factory.mktemp("sm-transport") / "endpoints" / "state.db")
    _put(store, "twin", server.url)
    _put(store, "locked", server.url, api_key=KEY)  # the gateway checks the signature
    _put(store, "small", server.url, payload_limit=500)
    _put(store, "down", f"http://127.0.0.1:{free_port()}")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        _put(store, "silent", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with asgi_in_thread(_breaks_mid_stream) as broken:
            _put(store, "broken", broken)
            with asgi_in_thread(create_gateway_app(store)) as url:
                yield url


def _session(secret: str = "any-secret") -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id="AKIDLOCAL", aws_secret_access_key=secret, region_name="eu-west-1"
    )


def _transport(
    gateway: str, name: str = "twin", secret: str = "any-secret", **options: Any
) -> SageMakerTransport:
    return SageMakerTransport(name, endpoint_url=gateway, session=_session(secret), **options)


@pytest.fixture(params=["tgi", "openai"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clients(api: str, server: ThreadServer, gateway: str) -> Iterator[tuple[LLMClient, LLMClient]]:
    """(over HTTP, straight to the server; over SageMaker Runtime, through the gateway)"""
    params = {"max_new_tokens": K, "ignore_eos": True}
    with (
        LLMClient(server.url, api=api, **params) as http,  # type: ignore[arg-type]
        LLMClient(transport=_transport(gateway), api=api, **params) as sagemaker,  # type: ignore[arg-type]
    ):
        yield http, sagemaker


def _same_stream(chunks: list[StreamChunk], expected: list[StreamChunk]) -> None:
    assert [c.text for c in chunks] == [c.text for c in expected]
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last, want = chunks[-1], expected[-1]
    assert (last.generated_text, last.finish_reason, last.generated_tokens, last.prompt_tokens) == (
        want.generated_text,
        want.finish_reason,
        want.generated_tokens,
        want.prompt_tokens,
    )
    assert last.request_id


# ---------------------------------------------------------------- the four calls
def test_generate_and_chat_answer_as_over_http(clients: tuple[LLMClient, LLMClient]) -> None:
    http, sagemaker = clients
    for call, arg in (("generate", PROMPT), ("chat", MESSAGES)):
        want, got = getattr(http, call)(arg), getattr(sagemaker, call)(arg)
        assert got.text == want.text and got.text
        assert (got.finish_reason, got.generated_tokens, got.prompt_tokens) == (
            want.finish_reason,
            K,
            want.prompt_tokens,
        )
        assert got.request_id and got.request_id != want.request_id
        _same_stream(
            list(getattr(sagemaker, f"{call}_stream")(arg)), list(getattr(http, f"{call}_stream")(arg))
        )


def test_async_calls(clients: tuple[LLMClient, LLMClient]) -> None:
    http, sagemaker = clients

    async def main() -> None:
        assert (await sagemaker.agenerate(PROMPT)).text == http.generate(PROMPT).text
        assert (await sagemaker.achat(MESSAGES)).text == http.chat(MESSAGES).text
        streamed = [c async for c in sagemaker.agenerate_stream(PROMPT)]
        _same_stream(streamed, list(http.generate_stream(PROMPT)))
        chat = [c async for c in sagemaker.achat_stream(MESSAGES)]
        _same_stream(chat, list(http.chat_stream(MESSAGES)))
        await sagemaker.aclose()

    asyncio.run(main())


def _cancelled(server: ThreadServer) -> float:
    return sum(
        sample.value
        for metric in server.service.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "tgi_request_failure" and sample.labels.get("err") == "cancelled"
    )


def test_stopping_a_stream_early_aborts_the_generation(server: ThreadServer, gateway: str) -> None:
    long = {"max_new_tokens": 3900, "ignore_eos": True}
    with LLMClient(transport=_transport(gateway), api="tgi") as client:
        before = _cancelled(server)
        for chunk in client.generate_stream(PROMPT, **long):
            assert not chunk.finished
            break
        assert until(lambda: _cancelled(server) > before, 30), "the generation ran on"

        async def stop_async() -> None:
            async with contextlib.aclosing(client.agenerate_stream(PROMPT, **long)) as chunks:
                async for _ in chunks:
                    break

        before = _cancelled(server)
        asyncio.run(stop_async())
        assert until(lambda: _cancelled(server) > before, 30), "the async generation ran on"


# ---------------------------------------------------------------- errors
def test_errors_are_twinserves(gateway: str) -> None:
    with LLMClient(transport=_transport(gateway), api="tgi", max_retries=0) as client:
        with pytest.raises(ValidationError) as bad:
            client.generate(PROMPT, top_p=7)  # the container's 422, via SageMaker's ModelError
        assert bad.value.status_code == 422 and "top_p" in str(bad.value)
        with pytest.raises(ValidationError):
            list(client.generate_stream(PROMPT, top_p=7))
    with LLMClient(transport=_transport(gateway, "nope"), api="openai", max_retries=0) as client:
        with pytest.raises(NotFoundError, match="Endpoint nope of account"):
            client.chat(MESSAGES)
        with pytest.raises(NotFoundError):
            list(client.chat_stream(MESSAGES))
    with (
        LLMClient(transport=_transport(gateway, "small"), max_retries=0) as client,
        pytest.raises(PayloadTooLargeError),
    ):
        client.generate("x" * 1000)
    with (
        LLMClient(transport=_transport(gateway, "down"), max_retries=0) as client,
        pytest.raises(NotReadyError),  # SageMaker's ServiceUnavailable: retried when allowed
    ):
        client.generate(PROMPT)


def test_the_api_key_is_the_secret(gateway: str) -> None:
    with LLMClient(transport=_transport(gateway, "locked", secret=KEY), max_new_tokens=2) as client:
        assert client.generate(PROMPT).text
        assert list(client.generate_stream(PROMPT))[-1].finished
    with LLMClient(transport=_transport(gateway, "locked", secret="wrong"), max_new_tokens=2) as client:
        with pytest.raises(UnauthorizedError, match="signature"):
            client.generate(PROMPT)
        with pytest.raises(UnauthorizedError):

            async def main() -> None:
                async for _ in client.agenerate_stream(PROMPT):
                    pass

            asyncio.run(main())


def test_failures_of_the_call_itself(gateway: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with LLMClient(transport=_transport(closed, connect_timeout=1), max_retries=0) as client:
        with pytest.raises(UnreachableError):
            client.generate(PROMPT)
        with pytest.raises(UnreachableError):
            asyncio.run(client.agenerate(PROMPT))
    with (
        LLMClient(transport=_transport(gateway, "silent", timeout=0.5), max_retries=0) as client,
        pytest.raises(RequestTimeoutError),
    ):
        client.generate(PROMPT)
    transport = _transport(gateway, "broken")
    with transport.stream("/generate_stream", {"inputs": "x"}) as response:
        events = iter(response.events)
        assert next(events) == "first"
        with pytest.raises(BadGatewayError, match="StreamBroken"):
            next(events)


def test_transport_details(gateway: str) -> None:
    transport = _transport(gateway, secret="very-secret-value")
    assert "very-secret" not in repr(transport) and "AKID" not in repr(transport)
    assert repr(transport) == f"SageMakerTransport('twin', region='eu-west-1', endpoint_url={gateway!r})"
    assert "very-secret" not in repr(LLMClient(transport=transport))
    assert transport._client.meta.config.retries["total_max_attempts"] == 1  # LLMClient retries, not botocore
    targeted = _transport(gateway, target_variant="primary", custom_attributes="trace=1")
    with LLMClient(transport=targeted, max_new_tokens=2) as client:
        assert client.generate(PROMPT).text
    with (
        LLMClient(transport=_transport(gateway, target_variant="blue"), max_retries=0) as client,
        pytest.raises(NotFoundError, match="Variant blue"),
    ):
        client.generate(PROMPT)
    with pytest.raises(NotFoundError, match="/tokenize"):
        transport.send("/tokenize", {"inputs": "x"})
    with LLMClient(transport=transport, max_new_tokens=2) as client:
        assert client.generate(PROMPT).text
        assert asyncio.run(client.agenerate(PROMPT)).text
    assert LLMClient(transport=transport, max_new_tokens=2).generate(PROMPT).text  # closed, yet usable
    # a region is made up for a local gateway when none is configured
    local = SageMakerTransport("twin", endpoint_url=gateway, session=boto3.session.Session(region_name=None))
    assert local.region is not None


def test_importing_the_client_does_not_import_boto3() -> None:
    code = "import sys, twinserve.client; print('boto3' in sys.modules or 'botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    missing = (
        "import sys; sys.modules['boto3'] = None\n"
        "try:\n    from twinserve.client import SageMakerTransport\n"
        "except ImportError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, check=True)
    assert "pip install 'twinserve[aws]'" in out.stdout


# ---------------------------------------------------------------- SSE re-assembly
STREAM = (
    'data: {"text": "é"}\n\n'
    ": keep-alive\n\n"
    "data: 日本語\r\n\r\n"
    "data: two\ndata: lines 🙂\r\r"
    "event: x\ndata:no-space\n\n"
    "data: [DONE]\n\n"
    "data: cut off"
).encode()


def _httpx_sse(data: bytes) -> list[str]:
    """What HttpTransport yields for the same bytes (httpx-sse on an httpx response)."""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)
    return [event.data for event in EventSource(response).iter_sse()]


def _decoded(pieces: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    out = [data for piece in pieces for data in decoder.feed(piece)]
    return out + decoder.end()


def test_sse_reassembly_matches_httpx_sse_at_every_cut() -> None:
    expected = _httpx_sse(STREAM)
    assert expected == ['{"text": "é"}', "日本語", "two\nlines 🙂", "no-space", "[DONE]"]
    for cut in range(len(STREAM) + 1):  # two pieces, cut at every byte (inside characters too)
        assert _decoded([STREAM[:cut], STREAM[cut:]]) == expected, cut
    for first in range(0, len(STREAM), 3):  # three pieces
        for second in range(first, len(STREAM), 5):
            pieces = [STREAM[:first], STREAM[first:second], STREAM[second:]]
            assert _decoded(pieces) == expected, (first, second)
    assert _decoded([bytes([b]) for b in STREAM]) == expected  # byte by byte


def test_sse_end_of_stream() -> None:
    for data in (b"data: a\n\r", b"data: a\r\r", b"data: a\n", b"data: a", b""):
        assert _decoded([data]) == _httpx_sse(data), data
    assert json.loads(_decoded([b'data: {"a": 1}\n\n'])[0]) == {"a": 1}
