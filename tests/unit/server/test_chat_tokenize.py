"""`POST /chat_tokenize`: a chat as `/v1/chat/completions` prompts the model, measured.

The property callers rely on (the RAG service trims its context with it): the number of
tokens equals the `usage.prompt_tokens` the chat completion of the same messages reports —
for the tokenizer's template, a model card's, a tokenizer that adds a BOS of its own (which a
rendered chat must not get twice), and with `truncate_prompt_tokens`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from tests.factories import tiny_llama_dir
from tests.servers import serve_config
from tests.unit.server.conftest import AppFactory, asgi_client, assert_protocol_error
from twinserve.engine.async_engine import AsyncEngine
from twinserve.registry.card import ALPACA_TEMPLATE, ModelCard
from twinserve.registry.resolve import ResolvedModel
from twinserve.server.app import create_app
from twinserve.server.service import ModelService

pytestmark = pytest.mark.anyio

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "héllo wörld 日本語 🙂"},
        {"role": "assistant", "content": "the quick brown fox"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "once upon "}, {"type": "text", "text": "a time"}],
        },
    ],
]


async def _measure_and_complete(http: httpx.AsyncClient, messages: list[dict[str, Any]], **extra: Any):
    measured = await http.post("/chat_tokenize", json={"messages": messages, **extra})
    assert measured.status_code == 200, measured.text
    completed = await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, **extra})
    assert completed.status_code == 200, completed.text
    return measured.json(), completed.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("messages", CHATS)
async def test_the_count_is_the_completions_prompt_tokens(
    shared_client: httpx.AsyncClient, shared_app: Any, messages: list[dict[str, Any]]
) -> None:
    answer, prompt_tokens = await _measure_and_complete(shared_client, messages)
    assert set(answer) == {"tokenize_response", "templated_text"}
    tokens, text = answer["tokenize_response"], answer["templated_text"]
    assert len(tokens) == prompt_tokens
    # the text is the tokenizer's own template, rendered for generation
    tokenizer = shared_app.state.service.tokenizer
    plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "once upon a time"}
             for m in messages]  # fmt: skip
    assert text == tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    # TGI's token shape, offsets into the templated text, ids as generation gets them
    assert all(set(t) == {"id", "text", "start", "stop"} for t in tokens)
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in tokens)
    assert [t["id"] for t in tokens] == tokenizer(text, add_special_tokens=False)["input_ids"]


async def test_truncate_prompt_tokens_counts_as_generation_does(shared_client: httpx.AsyncClient) -> None:
    answer, prompt_tokens = await _measure_and_complete(shared_client, CHATS[1], truncate_prompt_tokens=5)
    assert len(answer["tokenize_response"]) == prompt_tokens == 5
    full = (await shared_client.post("/chat_tokenize", json={"messages": CHATS[1]})).json()
    assert answer["tokenize_response"] == full["tokenize_response"][-5:]  # the last ones, as generation keeps


async def test_no_input_limit_it_measures(shared_client: httpx.AsyncClient, shared_app: Any) -> None:
    limit = shared_app.state.service.engine.config.max_input_tokens
    messages = [{"role": "user", "content": "the quick brown fox " * 100}]
    r = await shared_client.post("/chat_tokenize", json={"messages": messages})
    assert r.status_code == 200 and len(r.json()["tokenize_response"]) > limit
    too_long = await shared_client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


async def test_what_the_chat_route_refuses_is_refused_in_tgis_shape(shared_client: httpx.AsyncClient) -> None:
    for body, named in [
        ({"messages": CHATS[0], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": CHATS[0], "chat_template": "{{ 1 }}"}, "chat_template"),
        ({"messages": []}, "messages"),
        ({"inputs": "a TGI generate body"}, "messages"),
        ({"messages": CHATS[0], "truncate_prompt_tokens": 10_000}, "truncate"),
    ]:
        r = await shared_client.post("/chat_tokenize", json=body)
        assert r.status_code == 422, (body, r.text)
        assert named in assert_protocol_error(r, "tgi")["error"], body


async def test_it_is_documented_and_behind_the_api_key(make_app: AppFactory) -> None:
    app, _ = make_app(api_key="s3cret-key")
    body = {"messages": CHATS[0]}
    async with asgi_client(app) as http:
        r = await http.post("/chat_tokenize", json=body)
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        authorized = {"authorization": "Bearer s3cret-key"}
        assert (await http.post("/chat_tokenize", json=body, headers=authorized)).status_code == 200
        document = (await http.get("/openapi.json", headers=authorized)).json()
    operation = document["paths"]["/chat_tokenize"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest"
    )
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/ChatTokenizeResponse")
    assert set(document["components"]["schemas"]["ChatTokenizeResponse"]["properties"]) == {
        "tokenize_response",
        "templated_text",
    }


# ------------------------------------------------ the card's template; a BOS-adding tokenizer
async def _served(model_dir: Path, card: ModelCard | None = None) -> AsyncIterator[httpx.AsyncClient]:
    config = serve_config(model_dir)
    engine = AsyncEngine.launch(config.engine_config(str(model_dir)), warmup=False)
    service = ModelService(config, engine, ResolvedModel(model_dir, str(model_dir), card=card))
    try:
        async with asgi_client(create_app(config, service)) as http:
            yield http
    finally:
        service.shutdown()


@pytest.fixture()
async def with_card(tiny_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _served(tiny_model_dir, ModelCard(prompt_template="alpaca")):
        yield http


async def test_the_model_cards_template_is_the_one_measured(
    with_card: httpx.AsyncClient, tiny_model_dir: Path
) -> None:
    answer, prompt_tokens = await _measure_and_complete(with_card, CHATS[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    alpaca = tokenizer.apply_chat_template(
        CHATS[0], chat_template=ALPACA_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert answer["templated_text"] == alpaca and "### Instruction:" in alpaca
    assert len(answer["tokenize_response"]) == prompt_tokens


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer that prepends `<|endoftext|>` when asked for special tokens."""
    path = tiny_llama_dir(tmp_path_factory.mktemp("bos-model"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)]
    )
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
async def bos_client(bos_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _served(bos_model_dir):
        yield http


async def test_a_rendered_chat_gets_no_second_bos(bos_client: httpx.AsyncClient) -> None:
    answer, prompt_tokens = await _measure_and_complete(bos_client, CHATS[0])
    tokens = answer["tokenize_response"]
    assert len(tokens) == prompt_tokens and tokens[0]["text"] == "<|im_start|>"
    # /tokenize adds the tokenizer's special tokens, as /generate does: one more here
    plain = (await bos_client.post("/tokenize", json={"inputs": answer["templated_text"]})).json()
    assert plain[0]["id"] == 0 and len(plain) == len(tokens) + 1
