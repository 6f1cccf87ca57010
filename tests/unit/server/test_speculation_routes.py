"""What speculation shows operators: `speculation_*` counters and the acceptance rate in
/metrics when `speculate` (the `--speculate N` flag, TGI's SPECULATE) is on; answers equal
to those of a server without it; nothing of it when it is off."""

from __future__ import annotations

import json

import pytest

from tests.unit.server.conftest import AppFactory, asgi_client
from tests.unit.server.test_prefix_cache_routes import metric
from twinserve.config import ServeConfig

pytestmark = pytest.mark.anyio

BODY = {
    "inputs": "one two three four five six seven one two three",
    "parameters": {"max_new_tokens": 48, "ignore_eos": True, "details": True},
}


async def test_drafts_are_counted_and_answers_unchanged(make_app: AppFactory) -> None:
    answers = {}
    for speculate in (0, 4):
        app, _ = make_app(speculate=speculate)
        async with asgi_client(app) as http:
            answers[speculate] = (await http.post("/generate", json=BODY)).json()
            stream = await http.post("/generate_stream", json=BODY)
            metrics = (await http.get("/metrics")).text
        streamed = "".join(
            json.loads(line[5:])["token"]["text"]
            for line in stream.text.splitlines()
            if line.startswith("data:")
        )
        assert streamed == answers[speculate]["generated_text"]
        drafted = metric(metrics, "speculation_draft_tokens_total")
        accepted = metric(metrics, "speculation_accepted_tokens_total")
        if speculate:
            assert drafted >= accepted > 0
            assert metric(metrics, "speculation_steps_total") > 0
            assert metric(metrics, "speculation_acceptance_rate") == pytest.approx(accepted / drafted)
        else:
            assert drafted == accepted == 0
    # the same tokens and text (logprobs of drafted positions may differ in the last bits)
    for key in (0, 4):
        answers[key]["details"]["tokens"] = [t["id"] for t in answers[key]["details"]["tokens"]]
    assert answers[4]["generated_text"] == answers[0]["generated_text"]
    assert answers[4]["details"]["tokens"] == answers[0]["details"]["tokens"]


def test_tgi_environment_name_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServeConfig(model="m").speculate == 0
    monkeypatch.setenv("SPECULATE", "3")
    config = ServeConfig(model="m")
    assert config.speculate == 3 and config.engine_config("m").speculate == 3
