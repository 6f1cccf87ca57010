"""TGI routes: bodies, SSE events, headers and validation errors of /generate and friends."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.server.conftest import assert_protocol_error, sse_payloads

pytestmark = pytest.mark.anyio

PROMPT = "the quick brown fox"


async def test_generate_returns_text_details_and_tgi_headers(
    client: httpx.AsyncClient, app_and_service
) -> None:
    tokenizer = app_and_service[1].tokenizer
    r = await client.post(
        "/generate",
        json={
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": 6, "details": True, "decoder_input_details": True},
        },
        headers={"x-request-id": "abc-123"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    details = body["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(details["tokens"]) <= 6
    ids = [t["id"] for t in details["tokens"]]
    assert body["generated_text"] == tokenizer.decode(ids, skip_special_tokens=True)
    prompt_tokens = int(r.headers["x-prompt-tokens"])
    assert len(details["prefill"]) == prompt_tokens and details["prefill"][0]["logprob"] is None
    assert r.headers["x-request-id"] == "abc-123"
    assert int(r.headers["x-generated-tokens"]) == details["generated_tokens"]
    for name in (
        "x-compute-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-compute-type",
    ):
        assert name in r.headers


async def test_generate_without_details_has_text_only(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200
    assert set(r.json()) == {"generated_text"}


async def test_stream_sends_one_event_per_token_and_the_text_at_the_end(client: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 8, "details": True, "top_n_tokens": 2, "ignore_eos": True}
    r = await client.post("/generate_stream", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert [e["index"] for e in events] == list(range(1, 9))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["generated_tokens"] == 8 and last["details"]["finish_reason"] == "length"
    assert last["details"]["input_length"] > 0
    assert all(len(e["top_tokens"]) == 2 for e in events)


async def test_stream_equals_unary_for_greedy(client: httpx.AsyncClient) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10}}
    unary = (await client.post("/generate", json=body)).json()["generated_text"]
    streamed = sse_payloads((await client.post("/generate_stream", json=body)).text)[-1]["generated_text"]
    assert streamed == unary


async def test_compat_route_returns_a_list_or_a_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]
    r = await client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert sse_payloads(r.text)[-1]["generated_text"] is not None


async def test_seeded_sampling_repeats(client: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "seed": 7, "details": True}
    a = (await client.post("/generate", json={"inputs": PROMPT, "parameters": params})).json()
    b = (await client.post("/generate", json={"inputs": PROMPT, "parameters": params})).json()
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 7


async def test_the_stop_sequence_ends_generated_text_as_in_tgi(client: httpx.AsyncClient) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "ignore_eos": True}}
    full = (await client.post("/generate", json=body)).json()["generated_text"]
    assert len(full) >= 6
    stop = full[3:6]
    body["parameters"]["stop"] = [stop]
    body["parameters"]["details"] = True
    r = (await client.post("/generate", json=body)).json()
    assert r["generated_text"] == full[: full.index(stop) + len(stop)]
    assert r["details"]["finish_reason"] == "stop_sequence"


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"top_p": 1.5}, "`parameters.top_p` must be < 1"),
        ({"temperature": 0}, "`parameters.temperature` must be strictly positive"),
        ({"max_new_tokens": 0}, "`parameters.max_new_tokens` must be strictly positive"),
        ({"max_new_tokens": 10_000}, "must be <= 256"),
        ({"best_of": 2}, "`parameters.best_of` must be <= 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`parameters.stop` supports up to 4"),
        ({"stop": ["x" * 257]}, "at most 256 characters"),
        ({"top_n_tokens": 6}, "`parameters.top_n_tokens` must be <= 5"),
        ({"truncate": 129}, "`truncate` must be strictly positive and less than 128"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
async def test_bad_parameters_get_422_with_a_tgi_error(
    client: httpx.AsyncClient, parameters: dict, fragment: str
) -> None:
    r = await client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation" and fragment in body["error"]


async def test_too_long_input_and_empty_input_are_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"inputs": "fox " * 400, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and "must have less than 128 tokens" in r.json()["error"]
    r = await client.post("/generate", json={"inputs": "", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and "cannot be empty" in r.json()["error"]
    r = await client.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    r = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


async def test_truncate_keeps_the_last_tokens(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate", json={"inputs": "fox " * 400, "parameters": {"max_new_tokens": 2, "truncate": 50}}
    )
    assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "50"


async def test_tokenize_matches_the_tokenizer(client: httpx.AsyncClient, app_and_service) -> None:
    _, service = app_and_service
    r = await client.post("/tokenize", json={"inputs": PROMPT})
    assert r.status_code == 200
    tokens = r.json()
    assert [t["id"] for t in tokens] == service.tokenizer(PROMPT)["input_ids"]
    assert "".join(t["text"] for t in tokens) == PROMPT


@pytest.mark.parametrize(
    ("inputs", "stop"),
    [("world,", ["dQQ"]), ("world,", []), ("the quick brown fox", ["zzq"]), ("hello there", ["e"])],
)
async def test_tgi_clients_skipping_special_tokens_rebuild_the_text(
    client: httpx.AsyncClient, inputs: str, stop: list[str]
) -> None:
    # TGI's client convention: text += token.text unless token.special. Text released at EOS
    # (a partial stop string that never completed) must survive it.
    params = {"max_new_tokens": 30, "stop": stop, "details": True}
    events = sse_payloads(
        (await client.post("/generate_stream", json={"inputs": inputs, "parameters": params})).text
    )
    rebuilt = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert rebuilt == events[-1]["generated_text"]


TGI_GENERATION_ROUTES = ["/generate", "/generate_stream", "/", "/invocations"]


@pytest.mark.parametrize("path", TGI_GENERATION_ROUTES)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("grammar", {"type": "json", "value": {"type": "object"}}),
        ("watermark", True),
        ("adapter_id", "my-lora"),
    ],
)
async def test_unimplemented_tgi_features_are_a_422_naming_the_field(
    shared_client: httpx.AsyncClient, path: str, name: str, value: object
) -> None:
    """A grammar, a watermark or a LoRA adapter would change the answer: refused, never ignored."""
    parameters = {"max_new_tokens": 2, name: value}
    r = await shared_client.post(path, json={"inputs": PROMPT, "parameters": parameters})
    assert r.status_code == 422, r.text
    body = assert_protocol_error(r, "tgi")
    assert body["error_type"] == "validation" and name in body["error"]


@pytest.mark.parametrize("path", TGI_GENERATION_ROUTES)
async def test_the_neutral_values_of_those_features_are_accepted(
    shared_client: httpx.AsyncClient, path: str
) -> None:
    """What TGI's clients send by default (null grammar, no watermark, empty adapter) still generates."""
    for neutral in ({"grammar": None, "watermark": False, "adapter_id": ""}, {"adapter_id": None}):
        parameters = {"max_new_tokens": 2, **neutral}
        r = await shared_client.post(path, json={"inputs": PROMPT, "parameters": parameters})
        assert r.status_code == 200, (neutral, r.text)


async def test_timing_headers_are_whole_non_negative_numbers_on_unary_answers_only(
    shared_client: httpx.AsyncClient,
) -> None:
    """TGI's x-* headers (ms, except x-compute-time in s) on every non-streamed answer; a stream's
    headers leave before any token exists, so it carries none of them."""
    ms = ["x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"]
    generation = {"max_new_tokens": 3, "ignore_eos": True}
    for path, body in [
        ("/generate", {"inputs": PROMPT, "parameters": generation}),
        ("/", {"inputs": PROMPT, "parameters": generation}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}),
    ]:  # fmt: skip
        r = await shared_client.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        for name in [*ms, "x-prompt-tokens", "x-generated-tokens"]:
            assert r.headers[name].isdigit(), (path, name, r.headers.get(name))  # int ≥ 0, no sign
        assert float(r.headers["x-compute-time"]) >= 0, path  # seconds, as TGI
        assert r.headers["x-compute-type"] in ("cpu", "cuda"), path
        assert int(r.headers["x-generated-tokens"]) == 3 and int(r.headers["x-prompt-tokens"]) > 0, path
    streamed = await shared_client.post("/generate_stream", json={"inputs": PROMPT, "parameters": generation})
    assert streamed.status_code == 200 and streamed.headers["x-compute-type"]
    assert not {*ms, "x-compute-time", "x-generated-tokens"} & set(streamed.headers)
