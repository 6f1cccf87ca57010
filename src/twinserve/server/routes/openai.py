"""OpenAI routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from twinserve.engine.request import TokenEvent
from twinserve.errors import TwinserveError
from twinserve.server.auth import check_api_key
from twinserve.server.errors import openai_error
from twinserve.server.generation import ClientDisconnected, Generation
from twinserve.server.protocol import openai as oai
from twinserve.server.routes import admit, service_of
from twinserve.server.sse import DONE, sse_event, sse_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(check_api_key)])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": oai.ErrorResponse} for code in (401, 422, 424, 429, 503)
}


def _use_openai_errors(request: Request) -> None:
    request.state.wire = "openai"


@router.get("/models", response_model=oai.ModelList)
async def list_models(request: Request) -> oai.ModelList:
    """The one model this server serves."""
    service = service_of(request)
    engine = service.ready_engine()
    card = oai.ModelCard(
        id=service.model_id,
        created=int(service.started_at),
        root=service.model_id,
        max_model_len=engine.config.max_total_tokens,
    )
    return oai.ModelList(data=[card])


@router.post("/chat/completions", response_model=oai.ChatCompletion, responses=_ERRORS)
async def chat_completions(body: oai.ChatCompletionRequest, request: Request) -> Response:
    """Chat with the model's own chat template; `stream: true` sends chunks then `[DONE]`."""
    return await handle_chat(body, request)


@router.post("/completions", response_model=oai.Completion, responses=_ERRORS)
async def completions(body: oai.CompletionRequest, request: Request) -> Response:
    """Continue a prompt (text or token ids)."""
    return await handle_completion(body, request)


# --------------------------------------------------------------------- chat
async def handle_chat(body: oai.ChatCompletionRequest, request: Request) -> Response:
    _use_openai_errors(request)
    service = service_of(request)
    params = body.to_sampling(service.generation_defaults)
    prompt = service.chat_prompt(body.message_dicts())
    generation = admit(request, prompt=prompt, params=params, add_special_tokens=False)
    rid, created, model = oai.completion_id("chatcmpl"), oai.now(), body.model or service.model_id
    if body.stream:
        return sse_response(_chat_chunks(generation, body, rid, created, model))
    final = await _result(request, generation)
    if final is None:
        return Response(status_code=499)
    assert final.generated_text is not None and final.details is not None
    logprobs = None
    if body.logprobs:
        logprobs = oai.ChoiceLogprobs(
            content=[
                oai.token_logprob(t, top)
                for t, top in zip(final.details.tokens, final.details.top_tokens, strict=False)
            ]
        )
    completion = oai.ChatCompletion(
        id=rid,
        created=created,
        model=model,
        choices=[
            oai.ChatChoice(
                message=oai.AssistantMessage(content=final.generated_text),
                logprobs=logprobs,
                finish_reason=oai.finish_reason(final.finish_reason),
            )
        ],
        usage=oai.usage(final),
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=generation.timing_headers())


async def _chat_chunks(
    generation: Generation, body: oai.ChatCompletionRequest, rid: str, created: int, model: str
) -> AsyncIterator[bytes]:
    def chunk(delta: oai.DeltaMessage, **kw: object) -> bytes:
        return sse_event(
            oai.ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[oai.ChatChunkChoice(delta=delta, **kw)],
            )
        )

    try:
        yield chunk(oai.DeltaMessage(role="assistant", content=""))
        async for event in generation:
            logprobs = None
            if body.logprobs and event.token is not None:
                logprobs = oai.ChoiceLogprobs(content=[oai.token_logprob(event.token, event.top_tokens)])
            if event.text or logprobs is not None or event.finished:
                yield chunk(
                    oai.DeltaMessage(content=event.text),
                    logprobs=logprobs,
                    finish_reason=oai.finish_reason(event.finish_reason),
                )
            if event.finished and body.include_usage:
                yield sse_event(
                    oai.ChatCompletionChunk(
                        id=rid, created=created, model=model, choices=[], usage=oai.usage(event)
                    )
                )
        yield DONE
    except TwinserveError as exc:
        yield sse_event(openai_error(exc))
        yield DONE
    finally:
        generation.close()


# -------------------------------------------------------------- completions
async def handle_completion(body: oai.CompletionRequest, request: Request) -> Response:
    _use_openai_errors(request)
    service = service_of(request)
    params = body.to_sampling(service.generation_defaults)
    prompt, ids = body.prompt_text_or_ids()
    generation = admit(request, prompt=prompt, prompt_token_ids=ids, params=params)
    echo = ""
    if body.echo:
        echo = prompt if prompt is not None else service.tokenizer.decode(ids)
    rid, created, model = oai.completion_id("cmpl"), oai.now(), body.model or service.model_id
    if body.stream:
        return sse_response(_completion_chunks(generation, body, echo, rid, created, model))
    final = await _result(request, generation)
    if final is None:
        return Response(status_code=499)
    assert final.generated_text is not None and final.details is not None
    logprobs = None
    if body.logprobs is not None:
        logprobs = oai.completion_logprobs(final.details.tokens, final.details.top_tokens, len(echo))
    completion = oai.Completion(
        id=rid,
        created=created,
        model=model,
        choices=[
            oai.CompletionChoice(
                text=echo + final.generated_text,
                logprobs=logprobs,
                finish_reason=oai.finish_reason(final.finish_reason),
            )
        ],
        usage=oai.usage(final),
    )
    return JSONResponse(completion.model_dump(mode="json"), headers=generation.timing_headers())


async def _completion_chunks(
    generation: Generation, body: oai.CompletionRequest, echo: str, rid: str, created: int, model: str
) -> AsyncIterator[bytes]:
    def chunk(choice: oai.CompletionChoice, usage: oai.Usage | None = None) -> bytes:
        return sse_event(oai.Completion(id=rid, created=created, model=model, choices=[choice], usage=usage))

    try:
        offset = len(echo)
        if echo:
            yield chunk(oai.CompletionChoice(text=echo, finish_reason=None))
        async for event in generation:
            logprobs = None
            if body.logprobs is not None and event.token is not None:
                logprobs = oai.completion_logprobs([event.token], [event.top_tokens], offset)
            offset += len(event.text)
            if event.text or logprobs is not None or event.finished:
                yield chunk(
                    oai.CompletionChoice(
                        text=event.text,
                        logprobs=logprobs,
                        finish_reason=oai.finish_reason(event.finish_reason),
                    )
                )
            if event.finished and body.include_usage:
                yield sse_event(
                    oai.Completion(id=rid, created=created, model=model, choices=[], usage=oai.usage(event))
                )
        yield DONE
    except TwinserveError as exc:
        yield sse_event(openai_error(exc))
        yield DONE
    finally:
        generation.close()


async def _result(request: Request, generation: Generation) -> TokenEvent | None:
    try:
        return await generation.result(request.receive)
    except ClientDisconnected:
        return None
    finally:
        generation.close()
