"""Text Generation Inference's wire format (`/generate`, `/generate_stream`, `/`, `/info`).

Field names, defaults and the error body `{"error", "error_type"}` follow TGI so its
clients (`text_generation`, `huggingface_hub.InferenceClient`) work unmodified.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from twinserve.engine.request import FinishReason, GenerationDetails, SamplingParams, Token, TokenEvent
from twinserve.errors import ValidationError


class Parameters(BaseModel):
    """TGI's `parameters` object; unknown fields are rejected so typos don't pass silently."""

    model_config = ConfigDict(extra="forbid")

    best_of: int | None = Field(None, description="Only 1 is supported (no best-of sampling).")
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any | None = Field(None, description="Not supported; must be null.")
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = Field(False, description="Not supported; must be false.")
    adapter_id: str | None = Field(None, description="Not supported; must be null.")
    # vLLM-style extension used by load benchmarks
    ignore_eos: bool = False

    def to_sampling(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The engine's params; `defaults` (e.g. a model card's) fill what the request leaves unset."""
        if self.best_of not in (None, 1):
            raise ValidationError("`best_of` != 1 is not supported")
        if self.grammar is not None:
            raise ValidationError("`grammar` is not supported")
        if self.watermark:
            raise ValidationError("`watermark` is not supported")
        if self.adapter_id not in (None, ""):
            raise ValidationError("`adapter_id` is not supported: this server has no adapters loaded")
        given = self.model_dump(exclude_unset=True, exclude={"best_of", "grammar", "watermark", "adapter_id"})
        values = {**(defaults or {}), **given}
        if values.get("return_full_text") is None:
            values.pop("return_full_text", None)
        return sampling_params(values)


def sampling_params(values: dict[str, Any]) -> SamplingParams:
    """Build SamplingParams, turning pydantic's errors into one ValidationError (TGI wording)."""
    from pydantic import ValidationError as PydanticValidationError

    try:
        return SamplingParams.model_validate(values)
    except PydanticValidationError as exc:
        raise ValidationError(_first_message(exc)) from exc


def _first_message(exc: Any) -> str:
    err = exc.errors()[0]
    msg = str(err.get("msg", "invalid parameters"))
    return msg.removeprefix("Value error, ")


class GenerateRequest(BaseModel):
    """Body of `POST /generate`, `/generate_stream` and `/` (where `stream` picks the route)."""

    model_config = ConfigDict(extra="forbid")

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


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


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
    # provenance beyond TGI: the exact weights served
    model_path: str
    model_revision: str | None = None
    registry_name: str | None = None
    registry_version: int | None = None
    prompt_template: str = Field(
        "tokenizer", description="Chat template in use: tokenizer, a built-in name, or custom."
    )
    weights_sha256: str


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str
    parameters: Parameters | None = None


class SimpleToken(BaseModel):
    """One entry of `/tokenize`'s answer (TGI's shape: id, text, byte offsets)."""

    id: int
    text: str
    start: int
    stop: int


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
        )
    return StreamResponse(
        index=index,
        token=token_model,
        top_tokens=[token_out(t) for t in event.top_tokens] if params.top_n_tokens else None,
        generated_text=event.generated_text if event.finished else None,
        details=details,
    )
