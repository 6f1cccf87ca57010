"""`twinserve.client.request_id(rid)`: requests made inside carry `x-request-id: rid`, and the real
server (its RequestContextMiddleware keeps a valid incoming id) answers with the same id — sync
and async, unary and streamed, generation and the server calls."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ThreadServer, serve_config, thread_server
from twinserve.client import HttpTransport, LLMClient, request_id
from twinserve.client.context import current_request_id

PROMPT = "the quick brown fox"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ThreadServer]:
    with thread_server(serve_config(model_dir)) as s:
        yield s


@pytest.fixture(params=["tgi", "openai"])
def client(request: pytest.FixtureRequest, server: ThreadServer) -> Iterator[LLMClient]:
    with LLMClient(server.url, api=request.param, max_new_tokens=3) as c:
        yield c


def test_sync_calls_carry_the_id(client: LLMClient) -> None:
    with request_id("rag-req-1") as rid:
        assert rid == "rag-req-1" and current_request_id() == rid
        assert client.generate(PROMPT).request_id == rid
        assert client.chat(MESSAGES).request_id == rid
        assert {c.request_id for c in client.generate_stream(PROMPT)} == {rid}
        assert {c.request_id for c in client.chat_stream(MESSAGES)} == {rid}
    assert current_request_id() is None
    outside = client.generate(PROMPT).request_id
    assert outside and outside != "rag-req-1"  # the server's own id again


def test_async_calls_carry_the_id_each_task_its_own(client: LLMClient) -> None:
    async def one(rid: str) -> set[str | None]:
        with request_id(rid):
            seen = {(await client.agenerate(PROMPT)).request_id, (await client.achat(MESSAGES)).request_id}
            seen |= {c.request_id async for c in client.agenerate_stream(PROMPT)}
            seen |= {c.request_id async for c in client.achat_stream(MESSAGES)}
            return seen

    async def main() -> list[set[str | None]]:
        try:
            return list(await asyncio.gather(one("task-a"), one("task-b")))
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [{"task-a"}, {"task-b"}]


def test_get_and_the_server_calls_carry_it(server: ThreadServer) -> None:
    transport = HttpTransport(server.url)
    with request_id("outer"):
        with request_id("inner"):
            assert transport.get("/info").headers["x-request-id"] == "inner"
            assert transport.send("/tokenize", {"inputs": PROMPT}).headers["x-request-id"] == "inner"
        assert transport.get("/health").headers["x-request-id"] == "outer"  # restored on exit

        async def main() -> str:
            try:
                return (await transport.aget("/info")).headers["x-request-id"]
            finally:
                await transport.aclose()

        assert asyncio.run(main()) == "outer"  # asyncio.run copies the context into its task
    assert transport.get("/info").headers["x-request-id"] != "outer"
    transport.close()


def test_ids_the_server_would_drop_are_refused_here() -> None:
    for bad in ("", "with space", "x" * 129, "new\nline", "é"):
        with pytest.raises(ValueError, match="request id"), request_id(bad):
            pass
    with request_id() as generated:
        assert len(generated) == 32 and current_request_id() == generated
