"""`HttpTransport(url, app=…)`: the LLM server's app in this process (the monolith mode), streamed.

The real app on the tiny model, hosted as the RAG service hosts it (its lifespan run by the
test, which is what loads the model). Streaming is shown without timing: the first chunk
arrives while the engine still holds the request, a long generation is closed after a few
chunks, and the server counts it cancelled as soon as `aclose` returns. Small raw ASGI apps
stand for apps that fail in each way an app can: the caller gets an error, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.servers import serve_config
from twinserve.client import HttpTransport, LLMClient, StreamChunk, asgi_transport, request_id
from twinserve.errors import RequestTimeoutError, ServerError, UnauthorizedError
from twinserve.server.app import create_app
from twinserve.server.service import ModelService

K = 5
LONG = 3000  # tokens: far more than a test reads before it closes the stream
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "hello there"}]
URL = "http://llm.in-process"


@contextlib.asynccontextmanager
async def hosted(model_dir: Path, **overrides: Any) -> AsyncIterator[tuple[FastAPI, ModelService]]:
    """The server's app with its lifespan run here, as a host in the same process runs it."""
    config = serve_config(
        model_dir, max_total_tokens=4000, max_batch_total_tokens=8000, warmup=False, **overrides
    )
    service = ModelService(config)
    app = create_app(config, service)
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(service.wait_loaded, 120), service.failure
        yield app, service


def _cancelled(service: ModelService) -> float:
    for metric in service.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "tgi_request_failure" and sample.labels.get("err") == "cancelled":
                return sample.value
    return 0.0


async def _eventually(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `condition` on the event loop (the app runs on it too) until true or `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


def _in_process(app: Any, api: str = "tgi", **kwargs: Any) -> LLMClient:
    transport = HttpTransport(URL, app=app, **kwargs)
    return LLMClient(transport=transport, api=api, max_new_tokens=K, ignore_eos=True)  # type: ignore[arg-type]


# --------------------------------------------------------------- the real server app
@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_answers_match_the_buffered_asgi_transport(model_dir: Path, api: str) -> None:
    async def main() -> None:
        async with hosted(model_dir) as (app, _):
            buffered = LLMClient(transport=_Buffered(app), api=api, max_new_tokens=K, ignore_eos=True)  # type: ignore[arg-type]
            async with _in_process(app, api) as client, buffered:
                for call in ("agenerate", "achat"):
                    arg = PROMPT if call == "agenerate" else MESSAGES
                    got, want = await getattr(client, call)(arg), await getattr(buffered, call)(arg)
                    assert (got.text, got.generated_tokens, got.prompt_tokens) == (
                        want.text,
                        want.generated_tokens,
                        want.prompt_tokens,
                    )
                    chunks = [c async for c in getattr(client, f"{call}_stream")(arg)]
                    assert "".join(c.text for c in chunks) == chunks[-1].generated_text == want.text
                    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
                assert (await client.ainfo()).max_total_tokens == 4000
                assert (await client.achat_tokenize(MESSAGES)).count == (
                    await client.achat(MESSAGES)
                ).prompt_tokens
                assert await client.ahealth()

    asyncio.run(main())


class _Buffered(HttpTransport):
    """The same app through httpx's own ASGITransport (whole bodies), for comparison."""

    def __init__(self, app: Any) -> None:
        super().__init__(URL)
        self._aclient = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=URL, timeout=60)


@pytest.mark.parametrize("stream", ["agenerate_stream", "achat_stream"])
def test_chunks_arrive_while_generating_and_closing_aborts(model_dir: Path, stream: str) -> None:
    async def main() -> None:
        async with hosted(model_dir) as (app, service), _in_process(app, api="openai") as client:
            core = service.engine.engine
            before = _cancelled(service)
            arg = PROMPT if stream == "agenerate_stream" else MESSAGES
            received: list[StreamChunk] = []
            in_flight_at_first = None
            chunks = getattr(client, stream)(arg, max_new_tokens=LONG)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    received.append(chunk)
                    if in_flight_at_first is None:
                        in_flight_at_first = core.num_in_flight
                    if len(received) == 5:
                        break
            # the first chunk came while the engine held the request: the body was not buffered
            assert in_flight_at_first == 1
            assert len(received) == 5 and not any(c.finished for c in received)
            # closing sent http.disconnect, and the route aborted the generation before aclose returned
            assert _cancelled(service) == before + 1
            assert await _eventually(lambda: core.num_in_flight == 0)

    asyncio.run(main())


def test_a_cancelled_unary_call_aborts_its_generation(model_dir: Path) -> None:
    async def main() -> None:
        async with hosted(model_dir) as (app, service), _in_process(app) as client:
            core, before = service.engine.engine, _cancelled(service)
            call = asyncio.ensure_future(client.agenerate(PROMPT, max_new_tokens=LONG))
            assert await _eventually(lambda: core.num_in_flight == 1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await _eventually(lambda: _cancelled(service) == before + 1)
            assert await _eventually(lambda: core.num_in_flight == 0)

    asyncio.run(main())


def test_request_id_and_api_key_reach_the_app(model_dir: Path) -> None:
    async def main() -> None:
        async with hosted(model_dir, api_key="s3cret-key") as (app, _):
            async with _in_process(app, api_key="s3cret-key") as client:
                with request_id("monolith-1"):
                    assert (await client.agenerate(PROMPT)).request_id == "monolith-1"
                    assert {c.request_id async for c in client.agenerate_stream(PROMPT)} == {"monolith-1"}
            async with _in_process(app) as keyless:
                with pytest.raises(UnauthorizedError):
                    await keyless.agenerate(PROMPT)

    asyncio.run(main())


def test_sync_calls_are_refused_with_a_pointer_to_the_async_ones(model_dir: Path) -> None:
    client = _in_process(FastAPI())
    with pytest.raises(RuntimeError, match="async calls"):
        client.generate(PROMPT)
    with pytest.raises(RuntimeError, match="async calls"):
        client.info()
    assert "in_process=True" in repr(client._transport)


# ------------------------------------------------------------ apps that go wrong
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
EVENT = {"type": "http.response.body", "body": b"data: first\n\n", "more_body": True}


async def _raises_at_once(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise RuntimeError("a bug before the answer")


async def _returns_without_answering(scope: dict[str, Any], receive: Any, send: Any) -> None:
    return


@pytest.mark.parametrize("app", [_raises_at_once, _returns_without_answering])
def test_an_app_that_fails_before_answering_is_a_500(app: App) -> None:
    async def main() -> None:
        async with LLMClient(transport=HttpTransport(URL, app=app), max_retries=0) as client:
            with pytest.raises(ServerError) as raised:
                await client.agenerate(PROMPT)
            assert raised.value.status_code == 500
            with pytest.raises(ServerError):
                async for _ in client.agenerate_stream(PROMPT):
                    pass

    asyncio.run(main())


async def _raises_mid_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send(START)
    await send(EVENT)
    raise RuntimeError("died mid-stream")


async def _returns_mid_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send(START)
    await send(EVENT)


@pytest.mark.parametrize("app", [_raises_mid_stream, _returns_mid_stream])
def test_an_app_that_breaks_off_mid_stream_breaks_the_stream(app: App) -> None:
    async def main() -> None:
        transport = HttpTransport(URL, app=app)
        try:
            async with transport.astream("/generate_stream", {"inputs": PROMPT}) as response:
                assert response.status == 200
                assert await anext(response.events) == "first"
                with pytest.raises(ServerError, match="connection to") as raised:
                    await anext(response.events)
            assert raised.value.status_code == 502  # as a dropped connection reads
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_a_silent_app_times_out_and_is_told_the_client_left() -> None:
    told: list[str] = []

    async def silent(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # the request
        told.append((await receive())["type"])  # blocks until the client leaves

    async def main() -> None:
        async with LLMClient(transport=HttpTransport(URL, app=silent, timeout=0.2), max_retries=0) as client:
            with pytest.raises(RequestTimeoutError):
                await client.agenerate(PROMPT)
            assert await _eventually(lambda: told == ["http.disconnect"])

    asyncio.run(main())


def test_an_app_that_ignores_the_disconnect_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi_transport, "CLOSE_GRACE_S", 0.05)
    ended: list[str] = []

    async def stubborn(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/generate_stream":
            await send(START)
            await send(EVENT)
        try:
            await asyncio.Event().wait()  # never returns, never reads receive again
        except asyncio.CancelledError:
            ended.append(scope["path"])
            raise

    async def main() -> None:
        transport = HttpTransport(URL, app=stubborn)
        async with transport.astream("/generate_stream", {"inputs": PROMPT}) as response:
            assert await anext(response.events) == "first"
        assert ended == ["/generate_stream"]  # closing waited out its grace, then cancelled the app
        # a unary call its caller abandoned before any answer: closing the transport ends the app
        call = asyncio.ensure_future(transport.asend("/generate", {"inputs": PROMPT}))
        assert await _eventually(lambda: len(transport._async()._transport._tasks) == 1)  # type: ignore[attr-defined]
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert ended == ["/generate_stream"]  # told the client left, it runs on
        await transport.aclose()
        assert ended == ["/generate_stream", "/generate"]

    asyncio.run(main())
