"""Records run in-process: one `ModelService` (the server's own) over one AsyncEngine.

Each record is admitted as the matching route admits a request — the protocol schema parses
it, its `to_sampling` applies the model card's and the job's defaults, chat is rendered with
the card's template on a validation thread — and its answer is the body that route returns
(TGI records as `/invocations` answers them: a one-element list). The engine batches every
record in flight continuously, so the job keeps it full instead of waiting on HTTP.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from twinserve.engine.request import GenerateRequest, SamplingParams, TokenEvent
from twinserve.errors import EngineDeadError, OverloadedError, TwinserveError, ValidationError
from twinserve.jobs.records import ParsedRecord
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi
from twinserve.server.protocol.validation import validation_error
from twinserve.server.service import ModelService

M = TypeVar("M", bound=BaseModel)


@dataclass
class Outcome:
    """One record's result: the answer body, or the error that failed it."""

    answer: Any = None
    error: TwinserveError | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    status_code: int = 200


@dataclass(frozen=True)
class RecordIds:
    """Ids written into a record's answer, derived from the job, file and record number, so a
    resumed job writes the same bytes as an uninterrupted one."""

    key: str
    created: int

    @property
    def request_id(self) -> str:
        return f"req_{self.key}"


def parse_body(model: type[M], body: dict[str, Any]) -> M:
    """The route's body model, pydantic's errors in the server's words (as `/invocations`)."""
    try:
        return model.model_validate(body)
    except PydanticValidationError as exc:
        raise validation_error(exc.errors()) from exc


class EngineTarget:
    """Runs parsed records on the service's engine and returns each route's answer."""

    def __init__(self, service: ModelService) -> None:
        self.service = service
        self._card_defaults = service.generation_defaults

    async def run(self, parsed: ParsedRecord, ids: RecordIds, parameters: dict[str, Any]) -> Outcome:
        """`parameters` are the job's defaults: over the model card's, under the record's own."""
        defaults = {**self._card_defaults, **parameters}
        if parsed.kind in ("tgi", "text"):
            return await self._tgi(parsed, defaults)
        if parsed.kind == "chat":
            return await self._chat(parsed, ids, defaults)
        return await self._completion(parsed, ids, defaults)

    async def close(self) -> None:
        self.service.shutdown()

    # ------------------------------------------------------------------ TGI
    async def _tgi(self, parsed: ParsedRecord, defaults: dict[str, Any]) -> Outcome:
        body = parse_body(tgi.GenerateRequest, parsed.body)
        params = body.parameters.to_sampling(defaults, return_full_text=True)
        final = (await self._finals([(body.inputs, None)], [params], add_special_tokens=True))[0]
        answer = tgi.generate_response(final, params)
        dumped = answer.model_dump(mode="json", exclude={"details"} if answer.details is None else None)
        return _outcome([_same_on_every_run(dumped)], [final], 1)

    # ----------------------------------------------------------------- chat
    async def _chat(self, parsed: ParsedRecord, ids: RecordIds, defaults: dict[str, Any]) -> Outcome:
        body = parse_body(oai.ChatCompletionRequest, parsed.body)
        params = body.to_sampling(defaults)
        prompt = await self.service.chat_prompt(body.message_dicts())
        n = self._choices(1, body.choices_per_prompt)
        finals = await self._finals([(prompt, None)], oai.choice_params(params, n), add_special_tokens=False)
        answer = oai.chat_completion(
            finals,
            id=f"chatcmpl-{ids.key}",
            created=ids.created,
            model=body.model or self.service.model_id,
            logprobs=bool(body.logprobs),
            n=n,
        )
        return _outcome(_same_on_every_run(answer.model_dump(mode="json")), finals, n)

    # ---------------------------------------------------------- completions
    async def _completion(self, parsed: ParsedRecord, ids: RecordIds, defaults: dict[str, Any]) -> Outcome:
        body = parse_body(oai.CompletionRequest, parsed.body)
        params = body.to_sampling(defaults)
        prompts = body.prompts()
        n = self._choices(len(prompts), body.choices_per_prompt)
        per_prompt = oai.choice_params(params, n)
        finals = await self._finals(
            [p for p in prompts for _ in range(n)], per_prompt * len(prompts), add_special_tokens=True
        )
        tokenizer = self.service.tokenizer
        echoes = [
            ((text if text is not None else tokenizer.decode(token_ids)) if body.echo else "")
            for text, token_ids in (prompts[i // n] for i in range(len(finals)))
        ]
        answer = oai.text_completion(
            finals,
            echoes,
            id=f"cmpl-{ids.key}",
            created=ids.created,
            model=body.model or self.service.model_id,
            logprobs=body.logprobs is not None,
            n=n,
        )
        return _outcome(_same_on_every_run(answer.model_dump(mode="json")), finals, n)

    # -------------------------------------------------------------- engine
    def _choices(self, prompts: int, n: int) -> int:
        limit = self.service.config.max_client_batch_size
        if prompts * n > limit:
            raise ValidationError(
                f"at most {limit} choices per request (prompts × `n`). Given: {prompts} × {n}",
                param="n" if n > 1 else "prompt",
            )
        return n

    async def _finals(
        self,
        prompts: list[tuple[str | None, list[int] | None]],
        params: list[SamplingParams],
        *,
        add_special_tokens: bool,
    ) -> list[TokenEvent]:
        """Run every choice to its end (together, batched by the engine); the first error wins."""
        generations = []
        try:
            for (text, token_ids), choice in zip(prompts, params, strict=True):
                request = GenerateRequest(
                    prompt=text,
                    prompt_token_ids=token_ids,
                    params=choice,
                    request_id=uuid.uuid4().hex,
                    add_special_tokens=add_special_tokens,
                )
                generations.append(await self._submit(request))
            return list(await asyncio.gather(*(g.result() for g in generations)))
        finally:
            for generation in generations:
                generation.close()

    async def _submit(self, request: GenerateRequest) -> Any:
        delay = 0.05
        while True:
            try:
                return await self.service.submit(request)
            except OverloadedError:  # only when records hold more choices than the engine admits
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


def _same_on_every_run(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer without what the prefix cache served (`usage.prompt_tokens_details`, TGI's
    `details.cached_tokens`): that depends on which records ran before on the same engine, and
    a record's line must be the same bytes on a resume, a rerun or Ray Data's actors."""
    usage = answer.get("usage")
    if isinstance(usage, dict):
        usage.pop("prompt_tokens_details", None)
    details = answer.get("details")
    if isinstance(details, dict):
        details.pop("cached_tokens", None)
    return answer


def _outcome(answer: Any, finals: list[TokenEvent], n: int) -> Outcome:
    usage = oai.usage_of(finals, n)
    return Outcome(answer=answer, prompt_tokens=usage.prompt_tokens, generated_tokens=usage.completion_tokens)


def is_fatal(error: BaseException) -> bool:
    """An error after which no further record can succeed: the job fails instead."""
    return isinstance(error, EngineDeadError)
