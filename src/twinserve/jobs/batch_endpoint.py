"""Records sent to a twinserve endpoint, as SageMaker Batch Transform sends them to a model.

Each record's body goes to `POST /invocations` (an OpenAI batch line to its own `url`) over
the endpoint's own transport — `Platform.transport(endpoint)`, the one `LLMClient` uses,
API key included, HTTP for local endpoints and SageMaker Runtime for SageMaker ones. The
answer written is the server's body as it came: a batch output must be what the endpoint
said, not a re-encoding of it through the client's typed results. 429 and 503 are retried
with the client's `RetryPolicy`; any other error fails that record with the server's message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from twinserve.client import _wire
from twinserve.client._errors import error_from_response
from twinserve.client._retry import RetryPolicy, retry_after
from twinserve.client.transport import Transport
from twinserve.errors import ServerError, TwinserveError
from twinserve.jobs.batch_engine import Outcome, RecordIds
from twinserve.jobs.records import ParsedRecord


def endpoint_transport(name: str) -> Transport:
    """The transport of endpoint `name` (NotFoundError when there is none, or it has no URL)."""
    from twinserve.deploy.state import StateStore
    from twinserve.platforms import platform_of

    store = StateStore()
    endpoint = store.get_endpoint(name)
    return platform_of(name, store).transport(endpoint)


class EndpointTarget:
    """Sends parsed records to one endpoint; the job's defaults fill what a record leaves unset."""

    def __init__(self, transport: Transport, retry: RetryPolicy | None = None) -> None:
        self.transport = transport
        self.retry = retry or RetryPolicy(max_retries=8, backoff_base=0.5, backoff_cap=10.0)

    async def run(self, parsed: ParsedRecord, ids: RecordIds, parameters: dict[str, Any]) -> Outcome:
        path, body = self._request(parsed, parameters)
        attempt = 0
        while True:
            hint: float | None = None
            try:
                response = await self.transport.asend(path, body)
                if 200 <= response.status < 300:
                    return _answer(response.body, response.status)
                hint = retry_after(response.headers)
                raise error_from_response(
                    response.status, response.body, response.headers.get("x-request-id")
                )
            except TwinserveError as exc:
                if not self.retry.should_retry(exc, attempt):
                    raise
                delay = self.retry.delay(attempt, hint)
            await asyncio.sleep(delay)
            attempt += 1

    def _request(self, parsed: ParsedRecord, parameters: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The path and body to send: the job's defaults under the record's own values."""
        body = dict(parsed.body)
        if parsed.kind in ("tgi", "text"):
            body["parameters"] = {**parameters, **(body.get("parameters") or {})}
            return "/invocations", body
        kind: _wire.OpenAIKind = "chat" if parsed.kind == "chat" else "completion"
        body = {**_wire.openai_params(parameters, kind), **body}
        body.pop("stream", None)  # a batch writes whole answers
        return parsed.url or "/invocations", body

    async def close(self) -> None:
        await self.transport.aclose()


def _answer(raw: bytes, status: int) -> Outcome:
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise ServerError(f"the endpoint answered with a body that is not JSON: {exc}") from exc
    prompt, generated = _tokens(answer)
    return Outcome(answer=answer, prompt_tokens=prompt, generated_tokens=generated, status_code=status)


def _tokens(answer: Any) -> tuple[int, int]:
    """Token counts from OpenAI `usage` or TGI `details` (0 when the server gave none)."""
    if isinstance(answer, dict) and isinstance(answer.get("usage"), dict):
        usage = answer["usage"]
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    items = answer if isinstance(answer, list) else [answer]
    generated = 0
    for item in items:
        details = item.get("details") if isinstance(item, dict) else None
        if isinstance(details, dict):
            generated += int(details.get("generated_tokens") or 0)
    return 0, generated
