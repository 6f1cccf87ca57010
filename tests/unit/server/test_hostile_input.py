"""What Python's JSON parser accepts but no client should send: a 422 (400 on OpenAI routes) in
the route's error shape, never a 500 — on every route that takes a body."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.server.conftest import ROUTE_BODIES, assert_protocol_error

pytestmark = pytest.mark.anyio

ROUTES = list(ROUTE_BODIES)


def _raw(body: dict) -> str:
    import json

    return json.dumps(body)


def _with_field(path: str, raw_value: str) -> bytes:
    """The route's valid body with one more field holding `raw_value` (raw JSON text)."""
    body, _ = ROUTE_BODIES[path]
    return (_raw(body)[:-1] + f', "hostile": {raw_value}}}').encode()


def _post(client: httpx.AsyncClient, path: str, content: bytes):
    return client.post(path, content=content, headers={"content-type": "application/json"})


def _status(wire: str) -> int:
    return 400 if wire == "openai" else 422


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", '[1, {"x": NaN}]'])
async def test_non_finite_numbers_anywhere_are_refused(
    shared_client: httpx.AsyncClient, path: str, value: str
) -> None:
    r = await _post(shared_client, path, _with_field(path, value))
    wire = ROUTE_BODIES[path][1]
    assert r.status_code == _status(wire)
    error = assert_protocol_error(r, wire)
    assert "hostile" in (error.get("error") or error.get("message")) and "finite" in str(error)


@pytest.mark.parametrize("path", ROUTES)
async def test_a_nan_parameter_is_named(shared_client: httpx.AsyncClient, path: str) -> None:
    body, wire = ROUTE_BODIES[path]
    text = _raw(body)
    raw = (text.replace('"max_new_tokens": 2', '"max_new_tokens": 2, "temperature": NaN')
           if "max_new_tokens" in text else text[:-1] + ', "temperature": NaN}')  # fmt: skip
    r = await _post(shared_client, path, raw.encode())
    error = assert_protocol_error(r, wire)
    named = "parameters.temperature" if "parameters" in body else "temperature"
    assert f"`{named}`" in str(error) and r.status_code == _status(wire)
    if wire == "openai":
        assert error["param"] == named


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    "raw",
    [
        '"\\ud800"',  # a lone high surrogate
        '"ok \\udfff ok"',  # a lone low surrogate
        '{"\\ud800": 1}',  # in a key
    ],
)
async def test_invalid_unicode_is_refused(shared_client: httpx.AsyncClient, path: str, raw: str) -> None:
    r = await _post(shared_client, path, _with_field(path, raw))
    wire = ROUTE_BODIES[path][1]
    assert r.status_code == _status(wire)
    assert "Unicode" in str(assert_protocol_error(r, wire))


async def test_a_lone_surrogate_in_the_prompt_is_a_422(shared_client: httpx.AsyncClient) -> None:
    r = await _post(shared_client, "/generate", b'{"inputs": "Hi \\ud800 there"}')
    assert r.status_code == 422 and "`inputs` is not valid Unicode" in r.json()["error"]
    r = await _post(
        shared_client, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    "raw",
    [
        "9" * 5000,  # past Python's int parsing limit
        "[" * 40 + "]" * 40,  # deeper than any body of ours
        "[" * 3000 + "]" * 3000,  # deeper than Python's recursion limit
    ],
)
async def test_huge_numbers_and_deep_nesting_are_refused(
    shared_client: httpx.AsyncClient, path: str, raw: str
) -> None:
    r = await _post(shared_client, path, _with_field(path, raw))
    wire = ROUTE_BODIES[path][1]
    assert r.status_code == _status(wire)
    assert_protocol_error(r, wire)


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    "content",
    [b"not json", b"\xff\xfe{}", b"[1, 2]", b"null", b'"a string"', b'{"inputs": ', b""],
)
async def test_bodies_that_are_not_requests_are_refused(
    shared_client: httpx.AsyncClient, path: str, content: bytes
) -> None:
    r = await _post(shared_client, path, content)
    wire = ROUTE_BODIES[path][1]
    assert r.status_code == _status(wire)
    assert_protocol_error(r, wire)


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field", ["top_k", "max_new_tokens", "max_tokens", "seed", "n", "truncate"])
async def test_integers_out_of_any_range_are_refused(
    shared_client: httpx.AsyncClient, path: str, field: str
) -> None:
    body, wire = ROUTE_BODIES[path]
    big = 2**80
    raw = (_raw(body).replace('"max_new_tokens": 2', f'"max_new_tokens": 2, "{field}": {big}')
           if "parameters" in body else _raw(body)[:-1] + f', "{field}": {big}}}')  # fmt: skip
    r = await _post(shared_client, path, raw.encode())
    if r.status_code == 200:  # a field this protocol does not have: ignored, as its servers do
        assert field not in ("top_k", "seed")
        return
    assert r.status_code == _status(wire)
    assert_protocol_error(r, wire)
