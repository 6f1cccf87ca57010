"""In-process server tests: the real app over a tiny engine, through httpx's ASGITransport."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.servers import serve_config
from twinserve.engine.async_engine import AsyncEngine
from twinserve.registry.resolve import ResolvedModel
from twinserve.server.app import create_app
from twinserve.server.service import ModelService

AppFactory = Callable[..., tuple[FastAPI, ModelService]]


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
def make_app(tiny_model_dir: Path) -> Iterator[AppFactory]:
    """Build apps whose engine is loaded and ready; every engine is stopped at the end."""
    services: list[ModelService] = []

    def factory(**overrides: Any) -> tuple[FastAPI, ModelService]:
        config = serve_config(tiny_model_dir, **overrides)
        engine = AsyncEngine.launch(config.engine_config(str(tiny_model_dir)), warmup=False)
        service = ModelService(config, engine, ResolvedModel(tiny_model_dir, str(tiny_model_dir)))
        services.append(service)
        return create_app(config, service), service

    yield factory
    for service in services:
        service.shutdown()


@pytest.fixture()
def app_and_service(make_app: AppFactory) -> tuple[FastAPI, ModelService]:
    return make_app()


@contextlib.contextmanager
def serving_app(model: Path, **overrides: Any) -> Iterator[FastAPI]:
    """The app over a launched engine of `model` (serve_config's limits, `overrides` on top)."""
    config = serve_config(model, **overrides)
    engine = AsyncEngine.launch(config.engine_config(str(model)), warmup=False)
    service = ModelService(config, engine, ResolvedModel(model, str(model)))
    try:
        yield create_app(config, service)
    finally:
        service.shutdown()


@pytest.fixture(scope="module")
def shared_app(tiny_model_dir: Path) -> Iterator[FastAPI]:
    """One app for a whole module of tests that only send requests (building one costs ~0.3 s)."""
    with serving_app(tiny_model_dir) as app:
        yield app


@pytest.fixture()
async def shared_client(shared_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(shared_app) as http:
        yield http


@pytest.fixture()
async def client(app_and_service: tuple[FastAPI, ModelService]) -> AsyncIterator[httpx.AsyncClient]:
    app, _ = app_and_service
    async with asgi_client(app) as http:
        yield http


def asgi_client(app: FastAPI, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60, **kwargs
    )


def sse_payloads(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded (`[DONE]` kept as the string)."""
    out: list[Any] = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


# POST routes that take a JSON body, with a small valid body each, and their error protocol
ROUTE_BODIES: dict[str, tuple[dict[str, Any], str]] = {
    "/generate": ({"inputs": "hello", "parameters": {"max_new_tokens": 2}}, "tgi"),
    "/generate_stream": ({"inputs": "hello", "parameters": {"max_new_tokens": 2}}, "tgi"),
    "/": ({"inputs": "hello", "parameters": {"max_new_tokens": 2}}, "tgi"),
    "/tokenize": ({"inputs": "hello"}, "tgi"),
    "/chat_tokenize": ({"messages": [{"role": "user", "content": "hi"}]}, "tgi"),
    "/invocations": ({"inputs": "hello", "parameters": {"max_new_tokens": 2}}, "tgi"),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "openai"),
    "/v1/completions": ({"prompt": "hello", "max_tokens": 2}, "openai"),
}


def assert_protocol_error(response: httpx.Response, wire: str) -> dict[str, Any]:
    """A 4xx whose body is exactly the protocol's error shape (TGI's or OpenAI's)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    if wire == "tgi":
        assert set(body) == {"error", "error_type"} and isinstance(body["error"], str), body
        return dict(body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])
