"""In-process server tests: the real app over a tiny engine, through httpx's ASGITransport."""

from __future__ import annotations

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
