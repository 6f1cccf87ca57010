"""Production behaviour: overload, payload limit, API key, request ids, model errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.unit.server.conftest import asgi_client

pytestmark = pytest.mark.anyio

LONG = {"inputs": "hello", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}


async def test_a_burst_over_max_concurrent_requests_gets_429_at_once(make_app) -> None:
    app, service = make_app(max_concurrent_requests=2, max_batch_size=2)
    async with asgi_client(app) as http:
        responses = await asyncio.gather(*[http.post("/generate", json=LONG) for _ in range(8)])
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error_type"] == "overloaded" and r.headers["retry-after"]
    assert service.engine.engine.num_in_flight == 0


async def test_openai_routes_report_overload_in_their_shape(make_app) -> None:
    app, _ = make_app(max_concurrent_requests=1, max_batch_size=1)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": True}
    async with asgi_client(app) as http:
        responses = await asyncio.gather(*[http.post("/v1/chat/completions", json=body) for _ in range(4)])
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.json()["error"]["type"] == "rate_limit_exceeded" for r in refused)


async def test_payload_limit_gives_413(make_app) -> None:
    app, _ = make_app(payload_limit=1000)
    async with asgi_client(app) as http:
        r = await http.post("/generate", json={"inputs": "x" * 5000})
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
        r = await http.post("/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "payload limit" in r.json()["error"]["message"]
        assert (
            await http.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
        ).status_code == 200


async def test_api_key_guards_generation_routes_only(make_app) -> None:
    app, _ = make_app(api_key="s3cret-key")
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    async with asgi_client(app) as http:
        for path, payload in [
            ("/generate", body),
            ("/generate_stream", body),
            ("/", body),
            ("/invocations", body),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
            ("/tokenize", {"inputs": "hi"}),
        ]:
            r = await http.post(path, json=payload)
            assert r.status_code == 401, path
            assert "s3cret" not in r.text
            r = await http.post(path, json=payload, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401, path
            r = await http.post(path, json=payload, headers={"authorization": "Bearer s3cret-key"})
            assert r.status_code == 200, path
        r = await http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        for path in ("/health", "/ping", "/info", "/metrics"):
            assert (await http.get(path)).status_code == 200, path
        assert "s3cret" not in (await http.get("/info")).text


async def test_a_configured_key_with_spaces_matches_the_stripped_caller_key(make_app) -> None:
    app, _ = make_app(api_key="  s3cret-key \n")
    async with asgi_client(app) as http:
        r = await http.post(
            "/tokenize", json={"inputs": "hi"}, headers={"authorization": "Bearer s3cret-key "}
        )
        assert r.status_code == 200


async def test_the_docs_follow_the_key_unless_public(make_app) -> None:
    app, _ = make_app(api_key="s3cret-key")
    async with asgi_client(app) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == 401, path
        r = await http.get("/openapi.json", headers={"authorization": "Bearer s3cret-key"})
        assert r.status_code == 200 and "/generate" in r.json()["paths"]
    app, _ = make_app(api_key="s3cret-key", public_docs=True)
    async with asgi_client(app) as http:
        assert (await http.get("/openapi.json")).status_code == 200
        assert (await http.get("/docs")).status_code == 200
    app, _ = make_app()
    async with asgi_client(app) as http:  # no key: open, as before
        assert (await http.get("/docs")).status_code == 200


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    r = await client.get("/health", headers={"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    made = (await client.get("/health")).headers["x-request-id"]
    assert len(made) == 32
    r = await client.get("/health", headers={"x-request-id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"


async def test_the_same_request_id_twice_at_once_is_fine(client: httpx.AsyncClient) -> None:
    headers = {"x-request-id": "same"}
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 20, "ignore_eos": True}}
    rs = await asyncio.gather(*[client.post("/generate", json=body, headers=headers) for _ in range(3)])
    assert [r.status_code for r in rs] == [200, 200, 200]


async def test_a_failed_forward_is_424_and_the_server_keeps_serving(
    client: httpx.AsyncClient, app_and_service, monkeypatch
) -> None:
    runner = app_and_service[1].engine.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", fail_once)
    r = await client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    # a stable message: what the exception said stays in the server log
    assert r.json()["error"] == "Request failed during generation"
    r = await client.post("/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    r = await client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = await client.get("/generate")
    assert r.status_code == 405


async def test_payload_limit_without_content_length(make_app) -> None:
    app, _ = make_app(payload_limit=1000)

    async def chunks():
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    async with asgi_client(app) as http:
        r = await http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
