"""OpenAI routes: chat and completions, streamed and not, usage, logprobs and the error shape."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.server.conftest import assert_protocol_error, sse_payloads

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


async def test_chat_completion_uses_the_chat_template_and_counts_usage(
    client: httpx.AsyncClient, app_and_service
) -> None:
    tokenizer = app_and_service[1].tokenizer
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["model"] == app_and_service[1].model_id


async def test_chat_stream_matches_the_unary_answer(client: httpx.AsyncClient) -> None:
    request = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    unary = (await client.post("/v1/chat/completions", json=request)).json()
    r = await client.post(
        "/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks if c["choices"])
    assert text == unary["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert (
        len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == unary["choices"][0]["finish_reason"]
    )
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    # the same prompt a second time: its KV comes from the prefix cache, the counts are the same
    assert (
        usage["prompt_tokens_details"]["cached_tokens"]
        > unary["usage"]["prompt_tokens_details"]["cached_tokens"]
    )
    assert {k: v for k, v in usage.items() if k != "prompt_tokens_details"} == {
        k: v for k, v in unary["usage"].items() if k != "prompt_tokens_details"
    }


async def test_chat_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 3, "ignore_eos": True},
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"]


async def test_completion_with_echo_logprobs_and_token_prompt(
    client: httpx.AsyncClient, app_and_service
) -> None:
    tokenizer = app_and_service[1].tokenizer
    r = await client.post(
        "/v1/completions",
        json={"prompt": "hello world", "max_tokens": 4, "echo": True, "logprobs": 2, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith("hello world")
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == 4 and logprobs["text_offset"][0] == len("hello world")
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    ids = tokenizer("hello world")["input_ids"]
    r = await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)


async def test_completion_stream_ends_with_done(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hello world", "max_tokens": 5, "temperature": 0}
    unary = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    events = sse_payloads((await client.post("/v1/completions", json={**body, "stream": True})).text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == unary


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"messages": MESSAGES, "use_beam_search": True}, "use_beam_search"),
        ({"messages": MESSAGES, "guided_json": {"type": "object"}}, "guided_json"),
        ({"messages": MESSAGES, "logit_bias": {"42": 5}}, "logit_bias"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
    ],
)
async def test_bad_chat_requests_get_a_400_naming_the_field(
    client: httpx.AsyncClient, body: dict, param: str
) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text  # OpenAI's and vLLM's status; the openai SDK's BadRequestError
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split(".")[0] in error["message"]


async def test_models_lists_the_served_model(client: httpx.AsyncClient, app_and_service) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list" and body["data"][0]["id"] == app_and_service[1].model_id
    assert body["data"][0]["max_model_len"] == 256


async def test_unknown_fields_are_tolerated(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "some_future_field": {"x": 1}}
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hello"}),
        ("/v1/completions", {"prompt": "hello", "stream": True}),
        ("/v1/chat/completions", {"messages": MESSAGES, "stream": True}),
    ],
)
async def test_logit_bias_is_refused_on_every_route_that_takes_it(
    shared_client: httpx.AsyncClient, path: str, body: dict
) -> None:
    """A bias would change the answer and is not implemented: a 400 naming it, before any stream;
    an empty or null one (what SDKs may send) changes nothing and is accepted."""
    r = await shared_client.post(path, json={**body, "logit_bias": {"42": 5}})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    error = assert_protocol_error(r, "openai")
    assert error["type"] == "invalid_request_error" and error["param"] == "logit_bias"
    for neutral in ({}, None):
        r = await shared_client.post(path, json={**body, "logit_bias": neutral, "max_tokens": 2})
        assert r.status_code == 200, (neutral, r.text)


async def test_max_completion_tokens_caps_the_answer_and_wins_over_max_tokens(
    shared_client: httpx.AsyncClient,
) -> None:
    """OpenAI's newer name for max_tokens (what current SDKs send), bounded like it."""
    body = {"messages": MESSAGES, "ignore_eos": True}
    for fields, expected in (
        ({"max_completion_tokens": 3}, 3),
        ({"max_completion_tokens": 3, "max_tokens": 9}, 3),
    ):
        r = await shared_client.post("/v1/chat/completions", json={**body, **fields})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == expected
        assert r.json()["choices"][0]["finish_reason"] == "length"
    for bad in (0, -1, "many"):
        r = await shared_client.post("/v1/chat/completions", json={**body, "max_completion_tokens": bad})
        assert r.status_code == 400, (bad, r.text)
        assert assert_protocol_error(r, "openai")["param"] == "max_completion_tokens"
    r = await shared_client.post("/v1/chat/completions", json={**body, "max_completion_tokens": 10_000})
    assert r.status_code == 400 and assert_protocol_error(r, "openai")["code"] == "context_length_exceeded"
