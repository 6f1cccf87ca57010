"""OpenAI's wire format (`/v1/chat/completions`, `/v1/completions`, `/v1/models`).

Requests accept an explicit `null` for every optional field (the SDKs send them) and
tolerate fields we don't know (SDKs add new ones every release), but a field that would
change the answer is either implemented (`n`, a list of prompts, `presence_penalty`, and
vLLM's `min_p`, `min_tokens`, `stop_token_ids`, `include_stop_str_in_output`,
`skip_special_tokens`, `ignore_eos`, `truncate_prompt_tokens`, `top_k: -1`) or refused
with a 400 that names it (tools, logit_bias, beam search, guided decoding, ...), so nobody
gets a silently different answer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from twinserve.engine.request import (
    MAX_SEED,
    MAX_STOP_SEQUENCES,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKENS_FIELD,
    MAX_TOP_N_TOKENS,
    FinishReason,
    Penalty,
    SamplingParams,
    StopSequence,
    StrictlyPositive,
    Token,
    TokenCount,
    TokenEvent,
    TokenId,
)
from twinserve.errors import ValidationError
from twinserve.server.protocol.tgi import sampling_params

log = logging.getLogger(__name__)

# the most log-probability alternatives the legacy completions API gives (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5
# fields we know, that would change the answer, and that we don't implement: allowed only at
# the value that means "off"
_REFUSED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "early_stopping": (False,),
    "prompt_logprobs": (),
    "allowed_token_ids": ([],),
    "bad_words": ([],),
    "logits_processors": ([],),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "spaces_between_special_tokens": (True,),
    "return_tokens_as_token_ids": (False,),
    "priority": (0,),
    "functions": ([],),
    "function_call": ("none",),
    "prediction": (),
    "audio": (),
    "modalities": (["text"],),
    "web_search_options": (),
    "reasoning_effort": (),
}
_REFUSED_IN_CHAT: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "add_special_tokens": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "documents": ([],),
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class _SamplingFields(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    _refused: ClassVar[dict[str, tuple[Any, ...]]] = _REFUSED

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS_FIELD,
        description="Choices per prompt (≤ the server's max_client_batch_size in all).",
    )
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=MAX_SEED)
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; must be empty.")
    user: str | None = None
    # extensions vLLM accepts
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKENS_FIELD, description="-1 or 0 = off (vLLM).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="0 = off (vLLM).")
    repetition_penalty: StrictlyPositive | None = None
    min_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_FIELD)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    ignore_eos: bool | None = None
    truncate_prompt_tokens: TokenCount | None = None

    def _check_supported(self) -> None:
        if self.logit_bias:
            raise ValidationError("`logit_bias` is not supported", param="logit_bias")
        ignored = []
        for name, value in (self.model_extra or {}).items():
            accepted = self._refused.get(name)
            if accepted is None:
                ignored.append(name)
            elif value is not None and value not in accepted:
                raise ValidationError(f"`{name}` is not supported by this server", param=name)
        if ignored:  # fields of newer SDKs (`store`, `metadata`, ...), or a typo: findable in the log
            log.debug(
                "ignoring unknown fields", extra={"model": type(self).__name__, "fields": sorted(ignored)}
            )

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def _sampling(
        self, max_tokens: int | None, top_n: int | None, details: bool, defaults: dict[str, Any] | None
    ) -> SamplingParams:
        self._check_supported()
        values: dict[str, Any] = dict(defaults or {})
        if self.temperature is not None:
            if self.temperature == 0.0:  # OpenAI's greedy
                for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
                    values.pop(name, None)
                values["do_sample"] = False
            else:
                values["temperature"] = self.temperature
                values["do_sample"] = True
        _set_or_clear(values, "top_p", self.top_p, off=1.0)
        _set_or_clear(values, "top_k", self.top_k, off=(-1, 0))
        _set_or_clear(values, "min_p", self.min_p, off=0.0)
        if self.stop is not None:
            values["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            values["seed"] = self.seed % MAX_SEED  # OpenAI's seeds may be negative
        for name in (
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
            "min_tokens",
            "stop_token_ids",
            "skip_special_tokens",
            "ignore_eos",
        ):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if self.truncate_prompt_tokens is not None:
            values["truncate"] = self.truncate_prompt_tokens
        if max_tokens is not None:
            values["max_new_tokens"] = max_tokens
        if top_n:
            values["top_n_tokens"] = top_n
        values["details"] = details or bool(values.get("details"))
        values["include_stop_str_in_output"] = bool(self.include_stop_str_in_output)
        values["return_full_text"] = False
        return sampling_params(values)

    @property
    def is_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


def _set_or_clear(values: dict[str, Any], name: str, value: Any, *, off: Any) -> None:
    """Set a warper, or clear the default's when the request turns it off explicitly."""
    if value is None:
        return
    if value == off or (isinstance(off, tuple) and value in off):
        values.pop(name, None)
    else:
        values[name] = value


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice: a seeded request gives choice j seed + j, so choices
    differ and the whole answer stays reproducible."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [params.model_copy(update={"seed": (params.seed + j) % MAX_SEED}) for j in range(n)]


class ChatCompletionRequest(_SamplingFields):
    _refused: ClassVar[dict[str, tuple[Any, ...]]] = {**_REFUSED, **_REFUSED_IN_CHAT}

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    tools: list[Any] | None = Field(None, description="Not supported; must be empty.")
    tool_choice: Any | None = None
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')

    def to_sampling(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.tools:
            raise ValidationError("`tools` are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValidationError(
                "`response_format` other than text is not supported", param="response_format"
            )
        top_n = (self.top_logprobs or None) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self._sampling(max_tokens, top_n, bool(self.logprobs), defaults)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


PromptIds = list[TokenId]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | PromptIds | list[PromptIds] = Field(
        description="Text, token ids, or a list of either (one choice set per prompt)."
    )
    max_tokens: TokenCount | None = Field(None, description="Default 16, as OpenAI's.")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Not supported; must be empty.")

    def to_sampling(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.suffix:
            raise ValidationError("`suffix` is not supported", param="suffix")
        max_tokens = self.max_tokens if self.max_tokens is not None else 16
        return self._sampling(max_tokens, self.logprobs or None, self.logprobs is not None, defaults)

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """Each prompt as (text, None) or (None, token ids)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [(prompt, None)]
        if not prompt:
            raise ValidationError("`prompt` must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [(None, [int(p) for p in prompt])]  # type: ignore[arg-type]
        out: list[tuple[str | None, list[int] | None]] = []
        for item in prompt:
            if isinstance(item, str):
                out.append((item, None))
            elif isinstance(item, list) and item:
                out.append((None, list(item)))
            else:
                raise ValidationError(
                    "`prompt` lists hold texts or non-empty lists of token ids", param="prompt"
                )
        return out


# ----------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (OpenAI's prompt caching field)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "twinserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ------------------------------------------------------------------ adapters
def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's names: EOS and stop strings are both `stop`."""
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_of(finals: Sequence[TokenEvent], n: int) -> Usage:
    """Each prompt's tokens once (not once per choice), every choice's completion tokens."""
    prompt = sum(f.details.prompt_tokens for f in finals[::n] if f.details is not None)
    cached = sum(f.details.cached_tokens for f in finals[::n] if f.details is not None)
    completion = sum(f.details.generated_tokens for f in finals if f.details is not None)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def chat_logprobs(final: TokenEvent) -> ChoiceLogprobs:
    assert final.details is not None
    pairs = zip(final.details.tokens, final.details.top_tokens, strict=False)
    return ChoiceLogprobs(content=[token_logprob(t, top) for t, top in pairs])


def chat_completion(
    finals: Sequence[TokenEvent], *, id: str, created: int, model: str, logprobs: bool, n: int
) -> ChatCompletion:
    """The whole (not streamed) chat answer of finished choices: the route's and batch's alike."""
    choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content=final.generated_text or ""),
            logprobs=chat_logprobs(final) if logprobs else None,
            finish_reason=finish_reason(final.finish_reason),
        )
        for index, final in enumerate(finals)
    ]
    return ChatCompletion(id=id, created=created, model=model, choices=choices, usage=usage_of(finals, n))


def text_completion(
    finals: Sequence[TokenEvent],
    echoes: Sequence[str],
    *,
    id: str,
    created: int,
    model: str,
    logprobs: bool,
    n: int,
) -> Completion:
    """The whole completions answer: each choice's echoed prompt (or "") + its text."""
    choices = []
    for index, (final, echo) in enumerate(zip(finals, echoes, strict=True)):
        scores = None
        if logprobs and final.details is not None:
            scores = completion_logprobs(final.details.tokens, final.details.top_tokens, len(echo))
        choices.append(
            CompletionChoice(
                index=index,
                text=echo + (final.generated_text or ""),
                logprobs=scores,
                finish_reason=finish_reason(final.finish_reason),
            )
        )
    return Completion(id=id, created=created, model=model, choices=choices, usage=usage_of(finals, n))


def token_logprob(token: Token, top: list[Token]) -> TokenLogprob:
    return TokenLogprob(
        token=token.text,
        logprob=_finite(token.logprob),
        bytes=list(token.text.encode()),
        top_logprobs=[
            TopLogprob(token=t.text, logprob=_finite(t.logprob), bytes=list(t.text.encode())) for t in top
        ],
    )


def _finite(logprob: float | None) -> float:
    # OpenAI clients expect a number; -9999 is what the API itself sends for "impossible"
    if logprob is None or logprob != logprob or logprob == float("-inf"):
        return -9999.0
    return logprob


def completion_logprobs(
    tokens: list[Token], tops: list[list[Token]], start_offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = start_offset
    for token, top in zip(tokens, tops, strict=False):
        out.tokens.append(token.text)
        out.token_logprobs.append(_finite(token.logprob))
        out.top_logprobs.append({t.text: _finite(t.logprob) for t in top})
        out.text_offset.append(offset)
        offset += len(token.text)
    return out
