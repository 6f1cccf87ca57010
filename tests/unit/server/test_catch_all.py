"""A bug anywhere in a route is a 500 in the route's protocol, with the request id and no
internals, counted in the failure metrics; the server goes on serving."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.server.conftest import sse_payloads
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi

pytestmark = pytest.mark.anyio


def _boom(*args: object, **kwargs: object) -> object:
    raise KeyError("secret internal detail /home/user/model")


async def _failures(client: httpx.AsyncClient) -> str:
    text = (await client.get("/metrics")).text
    return next((line for line in text.splitlines() if 'err="internal"' in line), "")


async def test_a_bug_in_a_tgi_route_is_a_tgi_500(client: httpx.AsyncClient, monkeypatch) -> None:
    monkeypatch.setattr(tgi, "generate_response", _boom)
    r = await client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}},
                          headers={"x-request-id": "bug-1"})  # fmt: skip
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json() == {
        "error": "internal server error (request id bug-1); the server log has the details",
        "error_type": "internal",
    }
    assert "secret" not in r.text and (await _failures(client)).endswith(" 1.0")
    monkeypatch.undo()
    assert (
        await client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    ).status_code == 200


async def test_a_bug_in_an_openai_route_is_an_openai_500(client: httpx.AsyncClient, monkeypatch) -> None:
    monkeypatch.setattr(oai, "finish_reason", _boom)
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and r.headers["x-request-id"] in error["message"]
    assert "secret" not in r.text


async def test_a_bug_mid_stream_ends_the_stream_with_an_error_event(
    client: httpx.AsyncClient, monkeypatch
) -> None:
    monkeypatch.setattr(tgi, "stream_response", _boom)
    r = await client.post("/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    events = sse_payloads(r.text)
    assert r.status_code == 200 and events[-1]["error_type"] == "internal" and "secret" not in r.text
    monkeypatch.setattr(oai, "token_logprob", _boom)
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": True,
            "logprobs": True,
        },
    )
    events = sse_payloads(r.text)
    assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
