"""OpenAI routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

A request with several choices (`n`, or a list of prompts on `/v1/completions`) runs one
engine request per choice, all batched together by the engine; choice `i` of prompt `p`
has index `p * n + i`, as OpenAI numbers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from twinserve.engine.request import SamplingParams, TokenEvent
from twinserve.errors import ContextLengthError, ValidationError
from twinserve.server.auth import check_api_key
from twinserve.server.generation import ClientDisconnected, Generation, merged, results
from twinserve.server.json_body import StrictJSONRoute
from twinserve.server.protocol import openai as oai
from twinserve.server.routes import admit, service_of
from twinserve.server.sse import DONE, KEEPALIVE, keepalive_s, sse_content, sse_event, sse_response

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(check_api_key)], route_class=StrictJSONRoute
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": oai.ErrorResponse} for code in (400, 401, 413, 424, 429, 500, 503)
}


def use_openai_errors(request: Request) -> None:
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


@router.post(
    "/chat/completions",
    response_model=oai.ChatCompletion,
    responses={**_ERRORS, **sse_content(oai.ChatCompletionChunk)},
)
async def chat_completions(body: oai.ChatCompletionRequest, request: Request) -> Response:
    """Chat with the model's own chat template; `stream: true` sends chunks then `[DONE]`."""
    return await handle_chat(body, request)


@router.post(
    "/completions", response_model=oai.Completion, responses={**_ERRORS, **sse_content(oai.Completion)}
)
async def completions(body: oai.CompletionRequest, request: Request) -> Response:
    """Continue a prompt (text, token ids, or a list of either)."""
    return await handle_completion(body, request)


# ---------------------------------------------------------------- admission
async def _admit_choices(
    request: Request,
    prompts: Sequence[tuple[str | None, list[int] | None]],
    params: SamplingParams,
    n: int,
    *,
    prompt_param: str,
    add_special_tokens: bool,
) -> list[Generation]:
    """One generation per choice, prompt-major; all or none (a refusal closes the admitted)."""
    limit = service_of(request).config.max_client_batch_size
    if len(prompts) * n > limit:
        raise ValidationError(
            f"at most {limit} choices per request (prompts × `n`). Given: {len(prompts)} × {n}",
            param="n" if n > 1 else prompt_param,
        )
    generations: list[Generation] = []
    try:
        for text, ids in prompts:
            for choice in oai.choice_params(params, n):
                generations.append(
                    await admit(
                        request,
                        prompt=text,
                        prompt_token_ids=ids,
                        params=choice,
                        add_special_tokens=add_special_tokens,
                    )
                )
    except ContextLengthError as exc:
        _close(generations)
        exc.param = exc.param or prompt_param
        raise
    except BaseException:
        _close(generations)
        raise
    return generations


def _close(generations: list[Generation]) -> None:
    for generation in generations:
        generation.close()


async def _finals(request: Request, generations: list[Generation]) -> list[TokenEvent] | None:
    try:
        return await results(generations, request.receive)
    except ClientDisconnected:
        return None
    finally:
        _close(generations)


# --------------------------------------------------------------------- chat
async def handle_chat(body: oai.ChatCompletionRequest, request: Request) -> Response:
    use_openai_errors(request)
    service = service_of(request)
    params = body.to_sampling(service.generation_defaults)
    prompt = await service.chat_prompt(body.message_dicts())
    n = body.choices_per_prompt
    generations = await _admit_choices(
        request, [(prompt, None)], params, n, prompt_param="messages", add_special_tokens=False
    )
    rid, created, model = oai.completion_id("chatcmpl"), oai.now(), body.model or service.model_id
    if body.is_stream:
        chunks = _chat_chunks(generations, body, rid, created, model, keepalive_s(request))
        return sse_response(request, chunks)
    finals = await _finals(request, generations)
    if finals is None:
        return Response(status_code=499)
    completion = oai.chat_completion(
        finals, id=rid, created=created, model=model, logprobs=bool(body.logprobs), n=n
    )
    return _json(completion, generations[0], service.compute_type)


async def _chat_chunks(
    generations: list[Generation],
    body: oai.ChatCompletionRequest,
    rid: str,
    created: int,
    model: str,
    keepalive: float,
) -> AsyncIterator[bytes]:
    def chunk(index: int, delta: oai.DeltaMessage, **kw: object) -> bytes:
        choice = oai.ChatChunkChoice(index=index, delta=delta, **kw)
        return sse_event(oai.ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]))

    finals: list[TokenEvent | None] = [None] * len(generations)
    try:
        for index in range(len(generations)):
            yield chunk(index, oai.DeltaMessage(role="assistant", content=""))
        async for item in merged(generations, keepalive):
            if item is None:
                yield KEEPALIVE
                continue
            index, event = item
            logprobs = None
            if body.logprobs and event.token is not None:
                logprobs = oai.ChoiceLogprobs(content=[oai.token_logprob(event.token, event.top_tokens)])
            if event.text or logprobs is not None or event.finished:
                yield chunk(
                    index,
                    oai.DeltaMessage(content=event.text),
                    logprobs=logprobs,
                    finish_reason=oai.finish_reason(event.finish_reason),
                )
            if event.finished:
                finals[index] = event
        if body.include_usage:
            usage = oai.usage_of([f for f in finals if f is not None], body.choices_per_prompt)
            yield sse_event(
                oai.ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
            )
        yield DONE
    finally:
        _close(generations)


# -------------------------------------------------------------- completions
async def handle_completion(body: oai.CompletionRequest, request: Request) -> Response:
    use_openai_errors(request)
    service = service_of(request)
    params = body.to_sampling(service.generation_defaults)
    prompts = body.prompts()
    n = body.choices_per_prompt
    generations = await _admit_choices(
        request, prompts, params, n, prompt_param="prompt", add_special_tokens=True
    )
    echoes = [""] * len(generations)
    if body.echo:
        tokenizer = service.tokenizer
        texts = [text if text is not None else tokenizer.decode(ids) for text, ids in prompts]
        echoes = [texts[i // n] for i in range(len(generations))]
    rid, created, model = oai.completion_id("cmpl"), oai.now(), body.model or service.model_id
    if body.is_stream:
        chunks = _completion_chunks(generations, body, echoes, rid, created, model, keepalive_s(request))
        return sse_response(request, chunks)
    finals = await _finals(request, generations)
    if finals is None:
        return Response(status_code=499)
    completion = oai.text_completion(
        finals, echoes, id=rid, created=created, model=model, logprobs=body.logprobs is not None, n=n
    )
    return _json(completion, generations[0], service.compute_type)


async def _completion_chunks(
    generations: list[Generation],
    body: oai.CompletionRequest,
    echoes: list[str],
    rid: str,
    created: int,
    model: str,
    keepalive: float,
) -> AsyncIterator[bytes]:
    def chunk(choice: oai.CompletionChoice) -> bytes:
        return sse_event(oai.Completion(id=rid, created=created, model=model, choices=[choice]))

    finals: list[TokenEvent | None] = [None] * len(generations)
    offsets = [len(echo) for echo in echoes]
    try:
        for index, echo in enumerate(echoes):
            if echo:
                yield chunk(oai.CompletionChoice(index=index, text=echo, finish_reason=None))
        async for item in merged(generations, keepalive):
            if item is None:
                yield KEEPALIVE
                continue
            index, event = item
            logprobs = None
            if body.logprobs is not None and event.token is not None:
                logprobs = oai.completion_logprobs([event.token], [event.top_tokens], offsets[index])
            offsets[index] += len(event.text)
            if event.text or logprobs is not None or event.finished:
                yield chunk(
                    oai.CompletionChoice(
                        index=index,
                        text=event.text,
                        logprobs=logprobs,
                        finish_reason=oai.finish_reason(event.finish_reason),
                    )
                )
            if event.finished:
                finals[index] = event
        if body.include_usage:
            usage = oai.usage_of([f for f in finals if f is not None], body.choices_per_prompt)
            yield sse_event(oai.Completion(id=rid, created=created, model=model, choices=[], usage=usage))
        yield DONE
    finally:
        _close(generations)


def _json(answer: oai.ChatCompletion | oai.Completion, first: Generation, compute_type: str) -> Response:
    headers = {**first.timing_headers(), "x-compute-type": compute_type}  # TGI's, as on /generate
    return Response(answer.model_dump_json().encode(), media_type="application/json", headers=headers)
