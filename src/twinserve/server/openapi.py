"""The OpenAPI document of a running server: its schemas, with the limits of *this* server.

The request models can only state bounds that hold for every server (`top_p < 1`, at most
4 stop strings). What this server accepts also depends on how it was started and what it
serves: `max_new_tokens` up to max_total_tokens − 1, `truncate` up to max_input_tokens,
choices up to max_client_batch_size, token ids below the vocabulary size. Those go into
the document too, so a schema-driven client or fuzzer generates requests this server takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from twinserve.server.service import ModelService


@dataclass(frozen=True)
class ServedLimits:
    max_input_tokens: int
    max_total_tokens: int
    max_client_batch_size: int
    vocab_size: int | None  # None while the model loads


def served_limits(service: ModelService) -> ServedLimits:
    engine = service.engine if service.health()[0] else None
    limits = engine.config if engine is not None else service.config
    return ServedLimits(
        max_input_tokens=limits.max_input_tokens,
        max_total_tokens=limits.max_total_tokens,
        max_client_batch_size=service.config.max_client_batch_size,
        vocab_size=len(engine.engine.tokenizer) if engine is not None else None,
    )


def openapi_document(app: FastAPI, service: ModelService) -> dict[str, Any]:
    """The document, built once the model is loaded (before, without the vocabulary bounds)."""
    limits = served_limits(service)
    cached: tuple[ServedLimits, dict[str, Any]] | None = getattr(app.state, "openapi_document", None)
    if cached is not None and cached[0] == limits:
        return cached[1]
    document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    _tighten(document["components"]["schemas"], limits)
    app.state.openapi_document = (limits, document)
    return document


def _tighten(schemas: dict[str, Any], limits: ServedLimits) -> None:
    new_tokens = limits.max_total_tokens - 1
    bounds: dict[tuple[str, str], int] = {
        ("Parameters", "max_new_tokens"): new_tokens,
        ("Parameters", "truncate"): limits.max_input_tokens,
        ("ChatCompletionRequest", "max_tokens"): new_tokens,
        ("ChatCompletionRequest", "max_completion_tokens"): new_tokens,
        ("ChatCompletionRequest", "min_tokens"): new_tokens,
        ("ChatCompletionRequest", "truncate_prompt_tokens"): limits.max_input_tokens,
        ("ChatCompletionRequest", "n"): limits.max_client_batch_size,
        ("CompletionRequest", "max_tokens"): new_tokens,
        ("CompletionRequest", "min_tokens"): new_tokens,
        ("CompletionRequest", "truncate_prompt_tokens"): limits.max_input_tokens,
        ("CompletionRequest", "n"): limits.max_client_batch_size,
    }
    if limits.vocab_size is not None:
        last_id = limits.vocab_size - 1
        for model in ("ChatCompletionRequest", "CompletionRequest"):
            bounds[(model, "top_k")] = limits.vocab_size
            bounds[(model, "stop_token_ids")] = last_id
        bounds[("Parameters", "top_k")] = limits.vocab_size
        bounds[("CompletionRequest", "prompt")] = last_id
    for (model, field), maximum in bounds.items():
        prop = schemas.get(model, {}).get("properties", {}).get(field)
        if prop is not None:
            for integer in _integer_schemas(prop):
                integer["maximum"] = min(maximum, integer.get("maximum", maximum))


def _integer_schemas(schema: Any) -> list[dict[str, Any]]:
    """Every `{"type": "integer"}` inside a property (through anyOf, arrays of arrays)."""
    if not isinstance(schema, dict):
        return []
    found = [schema] if schema.get("type") == "integer" else []
    for child in schema.get("anyOf", []):
        found += _integer_schemas(child)
    if "items" in schema:
        found += _integer_schemas(schema["items"])
    return found
