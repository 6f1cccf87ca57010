"""Access logs: one structured line per request, with sizes and timings but no text by default."""

from __future__ import annotations

import json
import logging

import pytest

from tests.unit.server.conftest import asgi_client
from twinserve.logs import JsonFormatter

pytestmark = pytest.mark.anyio

SECRET_PROMPT = "my bank password is 1234"


async def _access_records(make_app, caplog, **overrides) -> list[logging.LogRecord]:
    app, _ = make_app(**overrides)
    caplog.set_level(logging.INFO, logger="twinserve.access")
    async with asgi_client(app) as http:
        r = await http.post(
            "/generate",
            json={"inputs": SECRET_PROMPT, "parameters": {"max_new_tokens": 3}},
            headers={"x-request-id": "rid-1", "authorization": "Bearer k"},
        )
        assert r.status_code == 200
    return [rec for rec in caplog.records if rec.name == "twinserve.access"]


async def test_access_log_has_sizes_and_timings_but_no_text(make_app, caplog) -> None:
    records = await _access_records(make_app, caplog, api_key="k")
    assert len(records) == 1
    line = JsonFormatter().format(records[0])
    entry = json.loads(line)
    assert entry["request_id"] == "rid-1" and entry["path"] == "/generate" and entry["status"] == 200
    assert entry["prompt_tokens"] > 0 and entry["generated_tokens"] == 3 and "ttft_ms" in entry
    assert SECRET_PROMPT not in line and "prompt" not in entry and "generated_text" not in entry
    assert "Bearer" not in line and '"k"' not in line


async def test_prompts_are_logged_only_when_asked(make_app, caplog) -> None:
    records = await _access_records(make_app, caplog, log_prompts=True)
    entry = json.loads(JsonFormatter().format(records[0]))
    assert entry["prompt"] == SECRET_PROMPT and isinstance(entry["generated_text"], str)
