"""Text Generation Inference's wire format (`/generate`, `/generate_stream`, `/`, `/info`,
`/tokenize`, `/chat_tokenize`).

Field names, defaults and the error body `{"error", "error_type"}` follow TGI so its
clients (`text_generation`, `huggingface_hub.InferenceClient`) work unmodified.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator
from pydantic import ValidationError as PydanticValidationError

from twinserve.engine.request import (
    MAX_STOP_SEQUENCES,
    FinishReason,
    GenerationDetails,
    OpenProbability,
    Penalty,
    SamplingParams,
    Seed,
    StopSequence,
    StrictlyPositive,
    Token,
    TokenCount,
    TokenEvent,
)
from twinserve.server.protocol.validation import validation_error

log = logging.getLogger(__name__)

# TGI's default `--max-top-n-tokens`
TGI_MAX_TOP_N_TOKENS = 5


class _IgnoresUnknown(BaseModel):
    """Unknown fields are ignored, as TGI (serde) ignores them: the HF Inference API's
    `options`, newer TGI fields. Logged at debug so a typo can still be found."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict) and log.isEnabledFor(logging.DEBUG):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                log.debug("ignoring unknown fields", extra={"model": cls.__name__, "fields": unknown})
        return data


class Parameters(_IgnoresUnknown):
    """TGI's `parameters` object. Every constraint is in the schema; limits that depend on the
    server (`max_new_tokens` + prompt ≤ max_total_tokens, `truncate` ≤ max_input_tokens) are
    checked against its configuration and answered with 422."""

    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported (no best-of sampling).")
    decoder_input_details: bool = Field(False, description="Return the prompt tokens with their logprobs.")
    details: bool = Field(False, description="Return finish reason, tokens and logprobs.")
    do_sample: bool = False
    frequency_penalty: Penalty | None = None
    grammar: None = Field(None, description="Not supported; must be null.")
    max_new_tokens: TokenCount | None = Field(
        None, description="At most this many new tokens; prompt + new ≤ the server's max_total_tokens."
    )
    repetition_penalty: StrictlyPositive | None = None
    return_full_text: bool | None = Field(
        None, description="Prepend the prompt; unset = false on /generate, true on / and /invocations (TGI)."
    )
    seed: Seed | None = None
    stop: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    temperature: StrictlyPositive | None = None
    top_k: TokenCount | None = None
    top_n_tokens: int | None = Field(None, ge=0, le=TGI_MAX_TOP_N_TOKENS)
    top_p: OpenProbability | None = None
    truncate: TokenCount | None = Field(
        None, description="Keep the last `truncate` prompt tokens (≤ max_input_tokens)."
    )
    typical_p: OpenProbability | None = None
    watermark: Literal[False] = Field(False, description="Not supported; must be false.")
    adapter_id: Literal[""] | None = Field(None, description="Not supported: this server has no adapters.")
    # vLLM-style extension used by load benchmarks
    ignore_eos: bool = False

    def to_sampling(
        self, defaults: dict[str, Any] | None = None, *, return_full_text: bool = False
    ) -> SamplingParams:
        """The engine's params; `defaults` (a model card's) fill what the request leaves unset,
        and `return_full_text` is the route's default (TGI: true on `/` and `/invocations`)."""
        given = self.model_dump(exclude_unset=True, exclude={"best_of", "grammar", "watermark", "adapter_id"})
        values = {"return_full_text": return_full_text, **(defaults or {}), **given}
        if values.get("return_full_text") is None:
            values["return_full_text"] = return_full_text
        # TGI keeps the stop sequence that ended generation in `generated_text`
        values["include_stop_str_in_output"] = True
        return sampling_params(values, prefix="parameters")


def sampling_params(values: dict[str, Any], *, prefix: str = "") -> SamplingParams:
    """SamplingParams from wire values, pydantic's errors as one ValidationError (TGI wording)."""
    try:
        return SamplingParams.model_validate(values)
    except PydanticValidationError as exc:
        raise validation_error(exc.errors(), prefix=prefix) from exc


class GenerateRequest(_IgnoresUnknown):
    """Body of `POST /generate`, `/generate_stream` and `/` (where `stream` picks the route)."""

    inputs: str = Field(description="The prompt.")
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[TokenOut] = Field(default_factory=list)
    top_tokens: list[list[TokenOut]] | None = None
    best_of_sequences: list[Any] | None = None
    cached_tokens: int = Field(0, description="Prompt tokens served from the prefix cache (twinserve).")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int
    cached_tokens: int = Field(0, description="Prompt tokens served from the prefix cache (twinserve).")


class StreamResponse(BaseModel):
    """One SSE event of `/generate_stream`; the last carries `generated_text` and `details`."""

    index: int
    token: TokenOut
    top_tokens: list[TokenOut] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    """`GET /info`: what is served and under which limits (TGI's fields plus our provenance)."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int
    max_client_batch_size: int = 1
    validation_workers: int = 1
    quantize: str | None = None
    router: str = "twinserve"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # provenance beyond TGI: the exact weights served (never a local path)
    model_revision: str | None = None
    registry_name: str | None = None
    registry_version: int | None = None
    prompt_template: str = Field(
        "tokenizer", description="Chat template in use: tokenizer, a built-in name, or custom."
    )
    weights_sha256: str


class TokenizeRequest(_IgnoresUnknown):
    """Body of `POST /tokenize`: the prompt as `/generate` would see it (same `truncate`, same limits)."""

    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)


class SimpleToken(BaseModel):
    """One entry of `/tokenize`'s answer (TGI's shape: id, text, character offsets)."""

    id: int
    text: str
    start: int
    stop: int


class TokenizeResponse(RootModel[list[SimpleToken]]):
    pass


class ChatTokenizeResponse(BaseModel):
    """`POST /chat_tokenize`'s answer (TGI's shape): the prompt the chat template rendered, and
    its tokens with offsets into that text."""

    tokenize_response: list[SimpleToken]
    templated_text: str


# ------------------------------------------------------------------ adapters
def token_out(token: Token, text: str | None = None) -> TokenOut:
    return TokenOut(
        id=token.id, text=token.text if text is None else text, logprob=token.logprob, special=token.special
    )


def details_out(details: GenerationDetails, params: SamplingParams) -> Details:
    return Details(
        finish_reason=details.finish_reason,
        generated_tokens=details.generated_tokens,
        seed=details.seed,
        prefill=[PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in details.prefill]
        if params.decoder_input_details
        else [],
        tokens=[token_out(t) for t in details.tokens],
        top_tokens=[[token_out(t) for t in top] for top in details.top_tokens]
        if params.top_n_tokens
        else None,
        cached_tokens=details.cached_tokens,
    )


def generate_response(final: TokenEvent, params: SamplingParams) -> GenerateResponse:
    assert final.generated_text is not None
    details = details_out(final.details, params) if params.details and final.details else None
    return GenerateResponse(generated_text=final.generated_text, details=details)


def stream_response(event: TokenEvent, index: int, params: SamplingParams) -> StreamResponse:
    """One SSE payload. `token.text` is the visible delta, so joining them gives `generated_text`.

    TGI clients skip the text of `special` tokens; when the EOS event also releases held-back
    text (a partial stop string that never completed), it is marked non-special so they keep it.
    """
    token = event.token
    if token is None:
        token_model = TokenOut(id=-1, text=event.text, logprob=None, special=not event.text)
    else:
        token_model = token_out(token, event.text)
        token_model.special = token.special and not event.text
    details = None
    if event.finished and event.details is not None and params.details:
        details = StreamDetails(
            finish_reason=event.details.finish_reason,
            generated_tokens=event.details.generated_tokens,
            seed=event.details.seed,
            input_length=event.details.prompt_tokens,
            cached_tokens=event.details.cached_tokens,
        )
    return StreamResponse(
        index=index,
        token=token_model,
        top_tokens=[token_out(t) for t in event.top_tokens] if params.top_n_tokens else None,
        generated_text=event.generated_text if event.finished else None,
        details=details,
    )
