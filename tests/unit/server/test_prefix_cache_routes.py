"""What the prefix cache shows clients: OpenAI's `usage.prompt_tokens_details.cached_tokens`,
TGI's `details.cached_tokens`, and its counters in /metrics; `prefix_cache=False` (the
`--no-prefix-cache` flag, PREFIX_CACHING=0) turns it all off."""

from __future__ import annotations

import pytest

from tests.unit.server.conftest import AppFactory, asgi_client
from twinserve.config import ServeConfig

pytestmark = pytest.mark.anyio

SYSTEM = "You are a helpful assistant: answer briefly."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is an LLM twin?"}]


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_a_repeated_context_is_served_from_the_cache_and_reported(make_app: AppFactory) -> None:
    app, _ = make_app()
    async with asgi_client(app) as http:
        first = (await http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4})).json()
        follow_up = [*CHAT, {"role": "assistant", "content": "A copy."}, {"role": "user", "content": "Why?"}]
        second = (
            await http.post("/v1/chat/completions", json={"messages": follow_up, "max_tokens": 4})
        ).json()
        tgi = await http.post(
            "/generate",
            json={"inputs": SYSTEM + " and more", "parameters": {"max_new_tokens": 2, "details": True}},
        )
        metrics = (await http.get("/metrics")).text
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 16 <= cached < second["usage"]["prompt_tokens"]
    assert tgi.json()["details"]["cached_tokens"] == 0  # no chat template: another beginning
    assert metric(metrics, "prefix_cache_hit_tokens_total") == cached
    assert metric(metrics, "prefix_cache_queries_total") == 3
    assert metric(metrics, "prefix_cache_tokens") > 0
    assert 0 < metric(metrics, "prefix_cache_hit_rate") < 1


async def test_the_cache_can_be_turned_off(make_app: AppFactory) -> None:
    app, service = make_app(prefix_cache=False)
    assert service.engine is not None and service.engine.engine.prefix_cache is None
    async with asgi_client(app) as http:
        for _ in range(2):
            r = await http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4})
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        metrics = (await http.get("/metrics")).text
    assert metric(metrics, "prefix_cache_queries_total") == 0


def test_tgi_environment_name_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServeConfig(model="m").prefix_cache is True
    monkeypatch.setenv("PREFIX_CACHING", "0")
    assert ServeConfig(model="m").prefix_cache is False
