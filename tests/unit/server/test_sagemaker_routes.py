"""SageMaker's container contract: /ping and /invocations with TGI, chat and prompt bodies."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.server.conftest import sse_payloads

pytestmark = pytest.mark.anyio


async def test_ping(client: httpx.AsyncClient) -> None:
    r = await client.get("/ping")
    assert r.status_code == 200


async def test_book_body_answers_like_the_llm_dlc(client: httpx.AsyncClient) -> None:
    # the body the LLM Twin book sends to its SageMaker endpoint
    body = {
        "inputs": "the quick brown fox",
        "parameters": {
            "max_new_tokens": 20,
            "top_p": 0.9,
            "temperature": 0.01,
            "return_full_text": False,
            "repetition_penalty": 1.1,
        },
    }
    r = await client.post("/invocations", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert isinstance(answer, list) and isinstance(answer[0]["generated_text"], str)
    full = await client.post(
        "/invocations", json={**body, "parameters": {**body["parameters"], "return_full_text": True}}
    )
    assert full.json()[0]["generated_text"].startswith("the quick brown fox")


async def test_messages_and_prompt_bodies(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/invocations", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = await client.post("/invocations", json={"prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


async def test_streaming_in_each_format(client: httpx.AsyncClient) -> None:
    tgi = sse_payloads(
        (
            await client.post(
                "/invocations", json={"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 3}}
            )
        ).text
    )
    assert tgi[-1]["generated_text"] is not None
    chat = sse_payloads(
        (
            await client.post(
                "/invocations",
                json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3},
            )
        ).text
    )
    assert chat[-1] == "[DONE]" and chat[0]["object"] == "chat.completion.chunk"


async def test_errors_follow_the_body_format(client: httpx.AsyncClient) -> None:
    r = await client.post("/invocations", json={"something": "else"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = await client.post("/invocations", json={"inputs": "hi", "parameters": {"top_p": 2}})
    assert r.status_code == 422 and "top_p" in r.json()["error"]
    r = await client.post("/invocations", json={"messages": [{"role": "user", "content": "hi"}], "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = await client.post("/invocations", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422
