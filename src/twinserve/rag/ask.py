"""A small caller of a running RAG service (`twinserve rag ask`, `twinserve up`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from httpx_sse import connect_sse

from twinserve.client._errors import error_from_event, error_from_response
from twinserve.errors import UnreachableError


def ask(
    url: str,
    body: Mapping[str, Any],
    *,
    api_key: str | None = None,
    on_token: Callable[[str], None] | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """POST /rag; with `on_token`, streamed (each token handed over as it comes) and the events
    folded into the same shape as the JSON answer."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {key: value for key, value in body.items() if value is not None}
    try:
        with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as http:
            if on_token is None:
                response = http.post("/rag", json=payload)
                if response.status_code != 200:
                    raise error_from_response(response.status_code, response.content)
                answer: dict[str, Any] = response.json()
                return answer
            return _streamed(http, {**payload, "stream": True}, on_token)
    except httpx.TransportError as exc:
        raise UnreachableError(f"cannot reach the RAG service at {url}: {exc}") from exc


def _streamed(http: httpx.Client, payload: dict[str, Any], on_token: Callable[[str], None]) -> dict[str, Any]:
    answer: dict[str, Any] = {"answer": "", "sources": []}
    with connect_sse(http, "POST", "/rag", json=payload) as events:
        if events.response.status_code != 200:
            raise error_from_response(events.response.status_code, events.response.read())
        for event in events.iter_sse():
            data = json.loads(event.data)
            if event.event == "sources":
                answer.update(data)
            elif event.event == "token":
                answer["answer"] += data["text"]
                on_token(data["text"])
            elif event.event == "done":
                answer.update(data)
            elif event.event == "error":
                raise error_from_event(data) or error_from_response(424, event.data.encode())
    return answer
