"""Property-based fuzzing of every route, in process: whatever arrives — valid bodies, invalid
ones, NaN and Infinity, lone surrogates, huge numbers, nulls, deep nesting — the answer is
never a 5xx nor a 424 (the model failing on an input that validation let through), and an
error always has its protocol's shape.

Two generators: schemathesis drives every operation of the app's own OpenAPI document
(positive and negative cases, and the response checks: documented status codes, content
types and schemas), and hypothesis mutates valid bodies with hostile JSON. Both run a
bounded, deterministic number of examples in CI; `TWINSERVE_FUZZ_EXAMPLES=2000` runs more.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.unit.server.conftest import ROUTE_BODIES, assert_protocol_error, serving_app

EXAMPLES = int(os.environ.get("TWINSERVE_FUZZ_EXAMPLES", "60"))


def without_lifespan(app: FastAPI) -> Any:
    """The app minus its lifespan: the schemathesis client runs one per call, and ours stops
    the engine on shutdown."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    return asgi


@pytest.fixture(scope="module")
def shared_app(tiny_model_dir: Path) -> Iterator[FastAPI]:
    """Short limits: a request without max_new_tokens generates up to max_total_tokens minus its
    prompt, and generating was most of this module's time; every validation path is the same."""
    with serving_app(tiny_model_dir, max_input_tokens=32, max_total_tokens=48) as app:
        yield app


@pytest.fixture(scope="module")
def api_schema(shared_app: FastAPI) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", without_lifespan(shared_app))


def protocol_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 4xx/5xx body is TGI's `{error, error_type}` or, on OpenAI routes, `{error: {...}}`; and
    never a 424: the tiny model fails on no input, so a 424 is an input validation let through."""
    if response.status_code < 400:
        return None
    assert response.status_code != 424, f"the engine failed on an input validation let through: {case.body}"
    body = json.loads(response.content)
    if isinstance(body.get("error"), dict):  # OpenAI's, on /v1/* and on /invocations with its bodies
        assert case.path.startswith("/v1/") or case.path == "/invocations", (case.path, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    else:
        assert not case.path.startswith("/v1/"), (case.path, body)
        assert set(body) == {"error", "error_type"} and isinstance(body["error"], str), body
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    protocol_error_shape,
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_of_the_openapi_document(api_schema: Any, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {o.path for o in operations} >= {
        *ROUTE_BODIES,
        "/health",
        "/ping",
        "/info",
        "/metrics",
        "/v1/models",
    }
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        def call(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)

        call()


# ------------------------------------------------------------- hostile JSON
HUGE = "<an integer of 5000 digits>"  # written into the JSON text after dumps (int() refuses it)


def _text() -> st.SearchStrategy[str]:
    # every code point, lone surrogates included (hypothesis leaves them out by default), and
    # the strings that broke servers before, often
    return st.one_of(
        st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None), max_size=12),
        st.sampled_from(["\ud800", "a\udfffb", "\x00", "", " ", "<|im_end|>", "\u2028", "x" * 300]),
    )


def _numbers() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from(
            [0, -1, 1, 2**31, 2**63, 2**64, 10**40, HUGE, 1e-320, -0.0, float("nan"), float("inf")]
        ),
    )


# values that broke servers before, drawn half of the time
HOSTILE = st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), "\ud800", "ok \udfff", HUGE, None, -1, 0, 2**64, 10**30,
     1e-320, "", [], {}, [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], {"\ud800": 1}]
)  # fmt: skip


def _json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), _numbers(), _text())
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(_text(), children, max_size=3)
        ),
        max_leaves=8,
    )


# the fields each protocol knows, so mutations hit real parameters as often as unknown ones
FIELDS = {
    "tgi": ["inputs", "stream", "parameters"],
    "parameters": ["max_new_tokens", "temperature", "top_k", "top_p", "typical_p", "stop", "seed",
                   "truncate", "details", "decoder_input_details", "top_n_tokens", "repetition_penalty",
                   "frequency_penalty", "return_full_text", "best_of", "do_sample", "watermark"],
    "openai": ["model", "user", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
               "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "min_p", "top_k",
               "min_tokens", "stop_token_ids", "echo", "stream_options", "logit_bias", "tools",
               "response_format", "truncate_prompt_tokens", "ignore_eos", "skip_special_tokens"],
}  # fmt: skip


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(list(ROUTE_BODIES)))
    body, wire = ROUTE_BODIES[path]
    body = json.loads(json.dumps(body))
    target = body.get("parameters", body) if wire == "tgi" and draw(st.booleans()) else body
    # a chat body (TGI's /chat_tokenize takes one too) gets OpenAI's fields
    names = FIELDS["parameters"] if target is not body else FIELDS["openai" if "messages" in body else wire]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.one_of(st.sampled_from(names), st.sampled_from(names), _text()))
        target[name] = draw(st.one_of(HOSTILE, _json_values()))
    # allow_nan: NaN/Infinity literals, as a careless client (or Python's json) writes them
    return path, json.dumps(body, allow_nan=True).replace(json.dumps(HUGE), "9" * 5000).encode()


@pytest.fixture(scope="module")
def fuzz_client(shared_app: FastAPI) -> Any:
    from starlette.testclient import TestClient

    with TestClient(without_lifespan(shared_app), raise_server_exceptions=False) as client:
        yield client


@given(request_body=hostile_bodies())
@settings(max_examples=EXAMPLES * 3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_hostile_bodies_never_get_a_5xx(fuzz_client: Any, request_body: tuple[str, bytes]) -> None:
    path, content = request_body
    r = fuzz_client.post(path, content=content, headers={"content-type": "application/json"})
    # 424: the engine failed on something validation should have refused (the tiny model fails on no input)
    assert r.status_code < 500 and r.status_code != 424, (path, content, r.status_code, r.text)
    if r.status_code >= 400:
        wire = ROUTE_BODIES[path][1]
        if path == "/invocations" and isinstance(r.json().get("error"), dict):
            wire = "openai"
        assert_protocol_error(httpx.Response(r.status_code, content=r.content), wire)
