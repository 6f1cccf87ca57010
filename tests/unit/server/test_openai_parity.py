"""Where users swap an OpenAI or vLLM server for ours: nulls, 400s naming the field, the
context-length error, several choices, and vLLM's sampling extras."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.server.conftest import sse_payloads
from twinserve.server.protocol import openai as oai

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hello there"}]
PROMPT = "the quick brown fox"


def _all_optional_null(model: type, required: dict) -> dict:
    body = {name: None for name, field in model.model_fields.items() if not field.is_required()}
    return {**body, **required}


async def test_explicit_nulls_are_accepted_for_every_optional_field(shared_client: httpx.AsyncClient) -> None:
    chat = _all_optional_null(oai.ChatCompletionRequest, {"messages": MESSAGES})
    r = await shared_client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    completion = _all_optional_null(oai.CompletionRequest, {"prompt": PROMPT})
    r = await shared_client.post("/v1/completions", json=completion)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 16  # null max_tokens = OpenAI's default
    r = await shared_client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": None}},
    )
    assert sse_payloads(r.text)[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("path", "param"), [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")]
)
async def test_too_long_a_prompt_is_openais_context_length_error(
    shared_client: httpx.AsyncClient, path: str, param: str
) -> None:
    long_text = "fox " * 400
    body = (
        {"messages": [{"role": "user", "content": long_text}]}
        if param == "messages"
        else {"prompt": long_text}
    )
    r = await shared_client.post(path, json={**body, "max_tokens": 10})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("This model's maximum context length is 128 tokens")
    r = await shared_client.post(path, json={**body, "max_tokens": 250} if param == "prompt" else {**body})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]


async def test_prompt_plus_max_tokens_over_the_total_is_a_context_length_error(
    shared_client: httpx.AsyncClient,
) -> None:
    r = await shared_client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 254})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert (
        "maximum context length is 256 tokens" in error["message"]
        and "254 in the completion" in error["message"]
    )


async def test_a_list_of_prompts_gets_one_choice_set_per_prompt(shared_client: httpx.AsyncClient) -> None:
    prompts = [PROMPT, "hello world", "once upon a time"]
    alone = []
    for p in prompts:
        r = await shared_client.post(
            "/v1/completions", json={"prompt": p, "max_tokens": 5, "ignore_eos": True}
        )
        alone.append(r.json())
    r = await shared_client.post(
        "/v1/completions", json={"prompt": prompts, "max_tokens": 5, "ignore_eos": True}
    )
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert body["usage"]["completion_tokens"] == 15
    # token-id prompts too, and streamed
    ids = [[5, 6, 7], [8, 9]]
    r = await shared_client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 3, "ignore_eos": True, "stream": True}
    )
    chunks = [e for e in sse_payloads(r.text) if e != "[DONE]"]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}


async def test_n_choices_are_reproducible_with_a_seed(shared_client: httpx.AsyncClient) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 8,
        "n": 3,
        "temperature": 1.0,
        "seed": -42,
        "ignore_eos": True,
    }
    first = (await shared_client.post("/v1/chat/completions", json=body)).json()
    again = (await shared_client.post("/v1/chat/completions", json=body)).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in again["choices"]]  # a negative seed works and repeats
    assert len(set(texts)) > 1  # each choice has its own seed
    assert first["usage"]["completion_tokens"] == 24
    one = (await shared_client.post("/v1/chat/completions", json={**body, "n": 1, "seed": -41})).json()
    assert one["choices"][0]["message"]["content"] == texts[1]  # choice j uses seed + j
    streamed = await shared_client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [e for e in sse_payloads(streamed.text) if e != "[DONE]"]
    by_choice = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                            if c["choices"] and c["choices"][0]["index"] == i) for i in range(3)}  # fmt: skip
    assert [by_choice[i] for i in range(3)] == texts


async def test_more_choices_than_the_server_allows_is_a_400(make_app) -> None:
    from tests.unit.server.conftest import asgi_client

    app, _ = make_app(max_client_batch_size=4)
    async with asgi_client(app) as http:
        r = await http.post("/v1/completions", json={"prompt": [PROMPT] * 3, "n": 2, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = await http.post("/v1/completions", json={"prompt": [PROMPT] * 5, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


async def _text(client: httpx.AsyncClient, **fields: object) -> tuple[str, dict]:
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, **fields})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], r.json()


async def test_vllm_sampling_extras_are_implemented(
    shared_client: httpx.AsyncClient, app_and_service
) -> None:
    tokenizer = app_and_service[1].tokenizer
    greedy, _ = await _text(shared_client, ignore_eos=True, logprobs=0)
    # top_k -1 and min_p 0 mean "off" in vLLM: the same greedy text
    assert (await _text(shared_client, ignore_eos=True, top_k=-1, min_p=0))[0] == greedy
    # stop_token_ids: generation ends at that token, with finish_reason stop
    ids = tokenizer(greedy, add_special_tokens=False)["input_ids"]
    stop_id = ids[2]
    text, body = await _text(shared_client, ignore_eos=True, stop_token_ids=[stop_id])
    assert body["choices"][0]["finish_reason"] == "stop" and len(text) < len(greedy)
    # min_tokens: stop tokens are banned until that many tokens are out
    _, first = await _text(shared_client, stop_token_ids=[ids[0]], max_tokens=12)
    _, later = await _text(shared_client, stop_token_ids=[ids[0]], min_tokens=4, max_tokens=12)
    assert first["usage"]["completion_tokens"] == 1 and later["usage"]["completion_tokens"] >= 5
    # presence and frequency penalties change greedy text once repeats would happen
    penalised, _ = await _text(shared_client, ignore_eos=True, presence_penalty=2.0, max_tokens=40)
    plain, _ = await _text(shared_client, ignore_eos=True, max_tokens=40)
    assert penalised != plain
    # skip_special_tokens reaches the request's detokenizer
    engine = app_and_service[1].engine.engine
    body = oai.CompletionRequest(prompt=PROMPT, skip_special_tokens=False)
    from twinserve.engine.request import GenerateRequest

    state = engine.validate(GenerateRequest(prompt=PROMPT, params=body.to_sampling()))
    assert state.detokenizer is not None and state.detokenizer.add(tokenizer.eos_token_id) == "<|im_end|>"


async def test_truncate_prompt_tokens_keeps_the_end_of_the_prompt(shared_client: httpx.AsyncClient) -> None:
    _, body = await _text(shared_client, truncate_prompt_tokens=2)
    assert body["usage"]["prompt_tokens"] == 2


async def test_the_openapi_document_states_the_constraints(shared_client: httpx.AsyncClient) -> None:
    schema = (await shared_client.get("/openapi.json")).json()["components"]["schemas"]
    params = schema["Parameters"]["properties"]
    assert params["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0}
    assert params["temperature"]["anyOf"][0]["exclusiveMinimum"] == 0.0
    assert params["stop"]["maxItems"] == 4 and params["stop"]["items"]["minLength"] == 1
    assert params["top_n_tokens"]["anyOf"][0]["maximum"] == 5
    chat = schema["ChatCompletionRequest"]["properties"]
    assert chat["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
