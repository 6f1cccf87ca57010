"""TGI routes: `/generate`, `/generate_stream`, `/` (compat) and `/tokenize`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from twinserve.errors import TwinserveError
from twinserve.server.auth import check_api_key
from twinserve.server.errors import tgi_error
from twinserve.server.generation import ClientDisconnected, Generation
from twinserve.server.protocol import tgi
from twinserve.server.routes import admit, service_of
from twinserve.server.sse import sse_event, sse_response

router = APIRouter(tags=["tgi"], dependencies=[Depends(check_api_key)])

_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": tgi.ErrorResponse, "description": "Input validation error"},
    424: {"model": tgi.ErrorResponse, "description": "Generation error"},
    429: {"model": tgi.ErrorResponse, "description": "Model is overloaded"},
    503: {"model": tgi.ErrorResponse, "description": "Model is loading or unhealthy"},
}


def _admit(request: Request, body: tgi.GenerateRequest) -> Generation:
    service = service_of(request)
    params = body.parameters.to_sampling(service.generation_defaults)
    return admit(request, prompt=body.inputs, params=params)


@router.post("/generate", response_model=tgi.GenerateResponse, responses=_ERRORS)
async def generate(body: tgi.GenerateRequest, request: Request) -> Response:
    """Generate text; the whole answer in one response."""
    return await unary_response(request, _admit(request, body), as_list=False)


@router.post("/generate_stream", responses=_ERRORS)
async def generate_stream(body: tgi.GenerateRequest, request: Request) -> Response:
    """Generate text as server-sent events, one per token; the last carries `generated_text`."""
    return stream_response(request, _admit(request, body))


@router.post("/", responses=_ERRORS)
async def compat_generate(body: tgi.GenerateRequest, request: Request) -> Response:
    """TGI's compat route: `stream` picks SSE or a one-element list."""
    generation = _admit(request, body)
    if body.stream:
        return stream_response(request, generation)
    return await unary_response(request, generation, as_list=True)


@router.post("/tokenize", response_model=list[tgi.SimpleToken])
async def tokenize(body: tgi.TokenizeRequest, request: Request) -> list[tgi.SimpleToken]:
    """The prompt's tokens with their byte offsets, as the model sees them."""
    tokenizer = service_of(request).tokenizer
    encoding = tokenizer(body.inputs, return_offsets_mapping=True)
    return [
        tgi.SimpleToken(id=tid, text=body.inputs[start:stop], start=start, stop=stop)
        for tid, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]


async def unary_response(request: Request, generation: Generation, *, as_list: bool) -> Response:
    try:
        final = await generation.result(request.receive)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        generation.close()
    body = tgi.generate_response(final, generation.params).model_dump(mode="json")
    if body["details"] is None:
        del body["details"]
    headers = {**generation.timing_headers(), "x-compute-type": service_of(request).compute_type}
    return JSONResponse([body] if as_list else body, headers=headers)


def stream_response(request: Request, generation: Generation) -> Response:
    return sse_response(_events(generation), {"x-compute-type": service_of(request).compute_type})


async def _events(generation: Generation) -> AsyncIterator[bytes]:
    index = 0
    try:
        async for event in generation:
            index += 1
            yield sse_event(tgi.stream_response(event, index, generation.params))
    except TwinserveError as exc:  # headers are sent: the error travels as the last event
        yield sse_event(tgi_error(exc))
    finally:
        generation.close()
