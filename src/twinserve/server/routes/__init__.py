"""HTTP routes, one module per protocol; each is a thin shell over `ModelService`."""

from __future__ import annotations

import uuid

from fastapi import Request

from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.server.generation import Generation
from twinserve.server.service import ModelService


def service_of(request: Request) -> ModelService:
    service: ModelService = request.app.state.service
    return service


async def admit(
    request: Request,
    *,
    prompt: str | None = None,
    prompt_token_ids: list[int] | None = None,
    params: SamplingParams,
    add_special_tokens: bool = True,
) -> Generation:
    """Submit to the engine and attach the generation to the request for the access log."""
    engine_request = GenerateRequest(
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
        params=params,
        # the engine's id is always fresh: client-supplied x-request-id values may repeat
        request_id=uuid.uuid4().hex,
        add_special_tokens=add_special_tokens,
    )
    request.state.metrics_counted = True  # submit counts it, admitted or refused
    generation = await service_of(request).submit(engine_request)
    if getattr(request.state, "generation", None) is None:  # the access log reports the first choice
        request.state.generation = generation
    if request.app.state.log_prompts:
        request.state.prompt = prompt if prompt is not None else prompt_token_ids
    return generation
