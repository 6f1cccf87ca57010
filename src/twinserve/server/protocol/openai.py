"""OpenAI's wire format (`/v1/chat/completions`, `/v1/completions`, `/v1/models`).

Requests tolerate fields we don't know (SDKs add new ones every release) but refuse
features we don't implement when they are actually used (n > 1, tools, logit_bias),
so nobody gets a silently different answer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from twinserve.engine.request import MAX_TOP_N_TOKENS, FinishReason, SamplingParams, Token, TokenEvent
from twinserve.errors import ValidationError
from twinserve.server.protocol.tgi import sampling_params


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

    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions vLLM and TGI accept
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    def _check_supported(self) -> None:
        if self.n != 1:
            raise ValidationError("`n` > 1 is not supported; send several requests")
        if self.logit_bias:
            raise ValidationError("`logit_bias` is not supported")
        if self.presence_penalty:
            raise ValidationError("`presence_penalty` is not supported; use `frequency_penalty`")

    def _sampling(
        self, max_tokens: int | None, top_n: int | None, details: bool, defaults: dict[str, Any] | None
    ) -> SamplingParams:
        self._check_supported()
        values: dict[str, Any] = dict(defaults or {})
        if self.temperature is not None:
            if self.temperature == 0.0:  # OpenAI's greedy
                values.pop("temperature", None)
                values["do_sample"] = False
                values.pop("top_p", None)
                values.pop("top_k", None)
            else:
                values["temperature"] = self.temperature
                values["do_sample"] = True
        if self.top_p is not None:
            if self.top_p < 1.0:
                values["top_p"] = self.top_p
            else:
                values.pop("top_p", None)
        if self.stop is not None:
            values["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        for name in ("seed", "frequency_penalty", "top_k", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if max_tokens is not None:
            values["max_new_tokens"] = max_tokens
        if top_n:
            values["top_n_tokens"] = top_n
        values["details"] = details or bool(values.get("details"))
        values["ignore_eos"] = self.ignore_eos
        values["return_full_text"] = False
        return sampling_params(values)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    response_format: dict[str, Any] | None = None

    def to_sampling(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.tools:
            raise ValidationError("`tools` are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValidationError("`response_format` other than text is not supported")
        top_n = self.top_logprobs if self.logprobs else None
        if top_n is not None and top_n > MAX_TOP_N_TOKENS:
            raise ValidationError(f"`top_logprobs` must be <= {MAX_TOP_N_TOKENS}")
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self._sampling(max_tokens, top_n, self.logprobs, defaults)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_sampling(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        if self.best_of not in (None, 1):
            raise ValidationError("`best_of` != 1 is not supported")
        if self.suffix:
            raise ValidationError("`suffix` is not supported")
        top_n = self.logprobs or None
        return self._sampling(self.max_tokens, top_n, self.logprobs is not None, defaults)

    def prompt_text_or_ids(self) -> tuple[str | None, list[int] | None]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt, None
        if prompt and all(isinstance(p, int) for p in prompt):
            return None, [int(p) for p in prompt]
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0], None
        raise ValidationError(
            "`prompt` must be one string or one list of token ids (batches are not supported)"
        )


# ----------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


def usage(final: TokenEvent) -> Usage:
    assert final.details is not None
    prompt, generated = final.details.prompt_tokens, final.details.generated_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


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
