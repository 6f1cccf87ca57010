"""Where users swap a TGI server for ours, the wire answers as TGI's does."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.server.conftest import asgi_client, sse_payloads

pytestmark = pytest.mark.anyio

PROMPT = "the quick brown fox"
SHORT = {"max_new_tokens": 6, "ignore_eos": True}


async def _text(client: httpx.AsyncClient, path: str, parameters: dict) -> str:
    r = await client.post(path, json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 200, r.text
    body = r.json()
    return str((body[0] if isinstance(body, list) else body)["generated_text"])


async def test_return_full_text_defaults_like_tgi(shared_client: httpx.AsyncClient) -> None:
    plain = await _text(shared_client, "/generate", SHORT)
    assert not plain.startswith(PROMPT)
    # TGI's compat route and SageMaker's /invocations prepend the prompt for text-generation models
    assert await _text(shared_client, "/", SHORT) == PROMPT + plain
    assert await _text(shared_client, "/invocations", SHORT) == PROMPT + plain
    # ...unless the request says otherwise, on any route
    assert await _text(shared_client, "/", {**SHORT, "return_full_text": False}) == plain
    assert await _text(shared_client, "/generate", {**SHORT, "return_full_text": True}) == PROMPT + plain


async def test_a_streamed_full_text_answer_ends_with_the_prompt_prepended(
    shared_client: httpx.AsyncClient,
) -> None:
    plain = await _text(shared_client, "/generate", SHORT)
    r = await shared_client.post("/", json={"inputs": PROMPT, "parameters": SHORT, "stream": True})
    events = sse_payloads(r.text)
    assert events[-1]["generated_text"] == PROMPT + plain
    assert "".join(e["token"]["text"] for e in events) == plain  # the tokens are only the new text


async def test_unknown_fields_are_ignored_as_tgi_does(shared_client: httpx.AsyncClient) -> None:
    body = {
        "inputs": PROMPT,
        "options": {"wait_for_model": True, "use_cache": False},  # the HF Inference API's
        "parameters": {**SHORT, "some_future_option": 3},
    }
    r = await shared_client.post("/generate", json=body)
    assert r.status_code == 200 and r.json()["generated_text"] == await _text(
        shared_client, "/generate", SHORT
    )


async def test_the_stop_sequence_is_in_tgi_text_and_out_of_openai_text(
    shared_client: httpx.AsyncClient,
) -> None:
    full = await _text(shared_client, "/generate", {**SHORT, "max_new_tokens": 12})
    stop = full[3:6]
    cut = full.index(stop)
    tgi = await _text(shared_client, "/generate", {**SHORT, "max_new_tokens": 12, "stop": [stop]})
    assert tgi == full[: cut + len(stop)]
    r = await shared_client.post(
        "/generate_stream",
        json={"inputs": PROMPT, "parameters": {**SHORT, "max_new_tokens": 12, "stop": [stop]}},
    )
    events = sse_payloads(r.text)
    assert "".join(e["token"]["text"] for e in events) == tgi == events[-1]["generated_text"]
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "stop": [stop]}
    openai = (await shared_client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    assert openai == full[:cut]
    body["include_stop_str_in_output"] = True  # vLLM's switch
    assert (await shared_client.post("/v1/completions", json=body)).json()["choices"][0]["text"] == tgi


@pytest.mark.parametrize("path", ["/generate_stream", "/"])
async def test_decoder_input_details_cannot_stream(shared_client: httpx.AsyncClient, path: str) -> None:
    body = {"inputs": PROMPT, "stream": True, "parameters": {**SHORT, "decoder_input_details": True}}
    r = await shared_client.post(path, json=body)
    assert r.status_code == 422
    assert r.json()["error"] == "`decoder_input_details` == true is not supported when streaming tokens"


async def test_truncate_is_bounded_by_the_input_limit(shared_client: httpx.AsyncClient) -> None:
    for path in ("/generate", "/tokenize"):
        r = await shared_client.post(path, json={"inputs": PROMPT, "parameters": {"truncate": 500}})
        assert r.status_code == 422 and "`truncate` must be strictly positive and less than 128" in r.text


async def test_tokenize_applies_truncate_and_the_input_limit(shared_client: httpx.AsyncClient) -> None:
    tokens = (await shared_client.post("/tokenize", json={"inputs": PROMPT})).json()
    kept = (
        await shared_client.post("/tokenize", json={"inputs": PROMPT, "parameters": {"truncate": 2}})
    ).json()
    assert kept == tokens[-2:] and "".join(t["text"] for t in tokens) == PROMPT
    r = await shared_client.post("/tokenize", json={"inputs": "fox " * 400})
    assert r.status_code == 422 and "`inputs` must have less than 128 tokens" in r.json()["error"]


async def test_get_root_answers_like_health(make_app) -> None:
    app, service = make_app()
    async with asgi_client(app) as http:
        ready = await http.get("/")
        assert ready.status_code == 200 and ready.json() == (await http.get("/health")).json()
        service.begin_drain()
        assert (await http.get("/")).status_code == 503


async def test_a_stream_waiting_in_the_queue_gets_keep_alive_comments(make_app) -> None:
    import asyncio

    app, _ = make_app(
        sse_keepalive_s=0.05, max_batch_size=1, max_total_tokens=2000, max_batch_total_tokens=4000
    )
    long = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1500, "ignore_eos": True}}
    async with asgi_client(app) as http:
        running = asyncio.ensure_future(http.post("/generate", json=long))
        await asyncio.sleep(0.05)  # the first request holds the only batch slot
        queued = await http.post("/generate_stream", json={"inputs": PROMPT, "parameters": SHORT})
        await running
    before_first_token = queued.text.split("data:", 1)[0]
    assert ": keep-alive" in before_first_token  # a comment: SSE clients skip it
    assert [e["index"] for e in sse_payloads(queued.text)] == list(range(1, 7))
