"""TGI routes: `/generate`, `/generate_stream`, `/` (compat), `/tokenize` and `/chat_tokenize`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from twinserve.errors import ValidationError
from twinserve.server.auth import check_api_key
from twinserve.server.generation import ClientDisconnected, Generation, merged
from twinserve.server.json_body import StrictJSONRoute
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi
from twinserve.server.routes import admit, service_of
from twinserve.server.sse import KEEPALIVE, keepalive_s, sse_content, sse_event, sse_response

router = APIRouter(tags=["tgi"], dependencies=[Depends(check_api_key)], route_class=StrictJSONRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": tgi.ErrorResponse, "description": "Missing or wrong API key"},
    413: {"model": tgi.ErrorResponse, "description": "Body over the payload limit"},
    422: {"model": tgi.ErrorResponse, "description": "Input validation error"},
    424: {"model": tgi.ErrorResponse, "description": "Generation error"},
    429: {"model": tgi.ErrorResponse, "description": "Model is overloaded"},
    500: {"model": tgi.ErrorResponse, "description": "Internal error (a bug; the log has the details)"},
    503: {"model": tgi.ErrorResponse, "description": "Model is loading, draining or unhealthy"},
}


async def _admit(
    request: Request, body: tgi.GenerateRequest, *, stream: bool, return_full_text: bool = False
) -> Generation:
    service = service_of(request)
    params = body.parameters.to_sampling(service.generation_defaults, return_full_text=return_full_text)
    if stream and params.decoder_input_details:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens",
            param="parameters.decoder_input_details",
        )
    return await admit(request, prompt=body.inputs, params=params)


@router.post("/generate", response_model=tgi.GenerateResponse, responses=_ERRORS)
async def generate(body: tgi.GenerateRequest, request: Request) -> Response:
    """Generate text; the whole answer in one response (`return_full_text` defaults to false)."""
    return await unary_response(request, await _admit(request, body, stream=False), as_list=False)


@router.post(
    "/generate_stream", response_class=Response, responses={**_ERRORS, **sse_content(tgi.StreamResponse)}
)
async def generate_stream(body: tgi.GenerateRequest, request: Request) -> Response:
    """Generate text as server-sent events, one per token; the last carries `generated_text`."""
    return stream_response(request, await _admit(request, body, stream=True))


@router.post(
    "/", response_model=list[tgi.GenerateResponse], responses={**_ERRORS, **sse_content(tgi.StreamResponse)}
)
async def compat_generate(body: tgi.GenerateRequest, request: Request) -> Response:
    """TGI's compat route: `stream` picks SSE or a one-element list; `return_full_text`
    defaults to true, as TGI's does for text-generation models."""
    generation = await _admit(request, body, stream=body.stream, return_full_text=True)
    if body.stream:
        return stream_response(request, generation)
    return await unary_response(request, generation, as_list=True)


@router.post("/tokenize", response_model=list[tgi.SimpleToken], responses=_ERRORS)
async def tokenize(body: tgi.TokenizeRequest, request: Request) -> Response:
    """The prompt's tokens with their character offsets, as `/generate` would see them
    (same `truncate`, same input limit), computed off the event loop."""
    service = service_of(request)
    truncate = body.parameters.truncate
    tokens = await service.off_loop(lambda: service.tokenize(body.inputs, truncate=truncate))
    payload = tgi.TokenizeResponse(tokens).model_dump_json().encode()
    return Response(payload, media_type="application/json")


@router.post("/chat_tokenize", response_model=tgi.ChatTokenizeResponse, responses=_ERRORS)
async def chat_tokenize(body: oai.ChatCompletionRequest, request: Request) -> Response:
    """A chat request's prompt as `/v1/chat/completions` gives it to the model: the text the
    model's chat template renders and its tokens, counted as generation counts them (so their
    number is that completion's `usage.prompt_tokens`). No input limit: it measures, so a
    caller can trim a prompt that does not fit. Computed off the event loop."""
    service = service_of(request)
    body.to_sampling(service.generation_defaults)  # what the chat route refuses is refused here
    prompt = await service.chat_prompt(body.message_dicts())
    truncate = body.truncate_prompt_tokens
    tokens = await service.off_loop(lambda: service.chat_tokens(prompt, truncate=truncate))
    answer = tgi.ChatTokenizeResponse(tokenize_response=tokens, templated_text=prompt)
    return Response(answer.model_dump_json().encode(), media_type="application/json")


async def unary_response(request: Request, generation: Generation, *, as_list: bool) -> Response:
    try:
        final = await generation.result(request.receive)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        generation.close()
    answer = tgi.generate_response(final, generation.params)
    payload = answer.model_dump_json(exclude={"details"} if answer.details is None else None)
    body = f"[{payload}]" if as_list else payload
    headers = {**generation.timing_headers(), "x-compute-type": service_of(request).compute_type}
    return Response(body.encode(), media_type="application/json", headers=headers)


def stream_response(request: Request, generation: Generation) -> Response:
    events = _events(generation, keepalive_s(request))
    return sse_response(request, events, {"x-compute-type": service_of(request).compute_type})


async def _events(generation: Generation, keepalive: float) -> AsyncIterator[bytes]:
    index = 0
    try:
        async for item in merged([generation], keepalive):
            if item is None:
                yield KEEPALIVE
                continue
            index += 1
            yield sse_event(tgi.stream_response(item[1], index, generation.params))
    finally:
        generation.close()
