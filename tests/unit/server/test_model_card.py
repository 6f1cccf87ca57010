"""The model card drives serving: its chat template, generation defaults and limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import serve_config
from tests.unit.server.conftest import asgi_client
from twinserve.engine.async_engine import AsyncEngine
from twinserve.registry.card import ALPACA_TEMPLATE, GenerationDefaults, ModelCard
from twinserve.registry.resolve import ResolvedModel
from twinserve.server.app import create_app
from twinserve.server.service import ModelService

pytestmark = pytest.mark.anyio

CARD = ModelCard(
    prompt_template="alpaca",
    generation_defaults=GenerationDefaults(max_new_tokens=7, repetition_penalty=1.1),
    max_input_tokens=100,
    max_total_tokens=200,
)


@pytest.fixture()
async def served(tiny_model_dir: Path):
    config = serve_config(tiny_model_dir)
    engine = AsyncEngine.launch(config.engine_config(str(tiny_model_dir)), warmup=False)
    resolved = ResolvedModel(
        tiny_model_dir, "models:/llm-twin/3", card=CARD, registry_name="llm-twin", registry_version=3
    )
    service = ModelService(config, engine, resolved)
    async with asgi_client(create_app(config, service)) as http:
        yield http, service
    service.shutdown()


async def test_chats_are_rendered_with_the_cards_template(served) -> None:
    http, service = served
    messages = [{"role": "user", "content": "hello world"}]
    r = await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    tokenizer = service.tokenizer
    alpaca = tokenizer.apply_chat_template(
        messages, chat_template=ALPACA_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert "### Instruction:" in alpaca
    expected = len(tokenizer(alpaca, add_special_tokens=False)["input_ids"])
    assert r.json()["usage"]["prompt_tokens"] == expected


async def test_card_defaults_apply_unless_the_request_overrides_them(served) -> None:
    http, _ = served
    r = await http.post(
        "/generate", json={"inputs": "hello", "parameters": {"ignore_eos": True, "details": True}}
    )
    assert r.json()["details"]["generated_tokens"] == 7  # the card's max_new_tokens
    r = await http.post(
        "/generate",
        json={"inputs": "hello", "parameters": {"ignore_eos": True, "details": True, "max_new_tokens": 3}},
    )
    assert r.json()["details"]["generated_tokens"] == 3


async def test_info_names_the_registry_version(served) -> None:
    http, _ = served
    info = (await http.get("/info")).json()
    assert (info["model_id"], info["registry_name"], info["registry_version"]) == ("llm-twin", "llm-twin", 3)
    assert info["prompt_template"] == "alpaca"


def test_card_limits_apply_where_nothing_else_set_them(tiny_model_dir: Path) -> None:
    resolved = ResolvedModel(tiny_model_dir, "models:/llm-twin/3", card=CARD)
    config = serve_config(tiny_model_dir)  # sets max_input_tokens / max_total_tokens itself
    service = ModelService(config)
    assert service._with_card(config, resolved).max_total_tokens == 256
    from twinserve.config import ServeConfig

    bare = ServeConfig(model=str(tiny_model_dir))
    applied = ModelService(bare)._with_card(bare, resolved)
    assert (applied.max_input_tokens, applied.max_total_tokens) == (100, 200)


def test_a_registry_versions_verified_hash_reaches_the_loader(tiny_model_dir: Path) -> None:
    config = serve_config(tiny_model_dir)
    service = ModelService(config)
    pinned = ResolvedModel(
        tiny_model_dir, "models:/llm-twin/3", registry_name="llm-twin", content_sha256="cd" * 32
    )
    assert service._engine_config(config, pinned).weights_sha256 == "cd" * 32
    folder = ResolvedModel(tiny_model_dir, str(tiny_model_dir))  # no recorded hash: the loader hashes
    assert service._engine_config(config, folder).weights_sha256 is None
