"""Production behaviour: overload, payload limit, API key, request ids, model errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.faults import POISON, FaultyRunner, is_poisoned
from tests.unit.server.conftest import asgi_client, assert_protocol_error, sse_payloads
from twinserve.engine.runner import RunnerOutput
from twinserve.engine.state import RequestState

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


async def test_the_key_is_also_accepted_in_x_api_key(make_app) -> None:
    """`x-api-key: KEY` is the documented alternative to `Authorization: Bearer KEY`, on every
    guarded route (docs included); a wrong one is a 401 in the route's protocol."""
    app, _ = make_app(api_key="s3cret-key")
    tgi_body = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    calls = [
        ("POST", "/generate", tgi_body, "tgi"),
        ("POST", "/generate_stream", tgi_body, "tgi"),
        ("POST", "/invocations", tgi_body, "tgi"),
        ("POST", "/tokenize", {"inputs": "hi"}, "tgi"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, "openai"),
        ("GET", "/v1/models", None, "openai"),
        ("GET", "/openapi.json", None, None),
    ]  # fmt: skip
    async with asgi_client(app) as http:
        for method, path, payload, wire in calls:
            ok = await http.request(method, path, json=payload, headers={"x-api-key": "s3cret-key"})
            assert ok.status_code == 200, (path, ok.text)
            for wrong in ({"x-api-key": "wrong"}, {"x-api-key": ""}, {"x-api-key": "s3cret-key-but-longer"}):
                r = await http.request(method, path, json=payload, headers=wrong)
                assert r.status_code == 401, (path, wrong)
                if wire is not None:  # TGI's or OpenAI's 401 body
                    error = assert_protocol_error(r, wire)
                    expected = "unauthorized" if wire == "tgi" else "authentication_error"
                    assert error.get("error_type", error.get("type")) == expected
                assert "s3cret" not in r.text


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


class _FailsMidAnswer(FaultyRunner):
    """The real runner, failing every pass that holds a poisoned row once that row has streamed
    some text: a fault in the middle of an answer, after the 200 and the first tokens are out."""

    def execute(self, rows: list[RequestState], *, prefill: bool) -> RunnerOutput:
        if any(is_poisoned(r) and "".join(r.text_parts) for r in rows):
            return super().execute(rows, prefill=prefill)
        return self.inner.execute(rows, prefill=prefill)


_MID = {"max_new_tokens": 24, "ignore_eos": True}
STREAM_ROUTES = [
    ("/generate_stream", {"inputs": f"{POISON} hi", "parameters": _MID}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": f"{POISON} hi"}], "max_tokens": 24, "ignore_eos": True,
         "stream": True},
    ),
    ("/v1/completions", {"prompt": f"{POISON} hi", "max_tokens": 24, "ignore_eos": True, "stream": True}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), STREAM_ROUTES)
async def test_an_engine_fault_mid_stream_ends_the_stream_with_an_error_event(
    client: httpx.AsyncClient, app_and_service, path: str, body: dict
) -> None:
    """Once the 200 and some text are out, a failing forward pass cannot become a 424: the
    client gets the error as the stream's last event (in the route's shape), not a cut connection."""
    service = app_and_service[1]
    faulty = _FailsMidAnswer(service.engine.engine.runner)
    service.engine.engine.runner = faulty
    r = await client.post(path, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert faulty.failed_passes >= 1
    if path == "/generate_stream":
        tokens, error = events[:-1], events[-1]
        assert tokens and "".join(e["token"]["text"] for e in tokens)  # text reached the client first
        assert all(e["generated_text"] is None for e in tokens) and len(tokens) < _MID["max_new_tokens"]
        assert error == {"error": "Request failed during generation", "error_type": "generation"}
    else:
        assert events[-1] == "[DONE]"
        choices = [c["choices"][0] for c in events[:-2]]
        assert "".join(c.get("delta", {}).get("content") or c.get("text") or "" for c in choices)
        assert all(c["finish_reason"] is None for c in choices)
        error = events[-2]["error"]
        assert error["message"] == "Request failed during generation" and error["type"] == "server_error"
    assert "injected" not in r.text  # the cause stays in the server log
    assert 'tgi_request_failure{err="generation"} 1.0' in (await client.get("/metrics")).text
    # the rest of the server is unharmed: a clean stream on the same engine runs to its end
    clean = await client.post("/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
    assert sse_payloads(clean.text)[-1]["generated_text"] is not None
