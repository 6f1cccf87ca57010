"""What a generation request is, inside the engine and out of it.

`SamplingParams` follows TGI's parameter names and semantics (a request samples when
`do_sample` is set *or* any warper — temperature ≠ 1, top_k, top_p, typical_p — is
given), and its validation messages read like TGI's so they can go to clients as-is.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

from twinserve.errors import TwinserveError

MAX_TOP_N_TOKENS = 5
MAX_STOP_SEQUENCES = 4


class FinishReason(enum.StrEnum):
    """Why a request stopped generating (TGI's names)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


class RequestStatus(enum.Enum):
    """Lifecycle of a request inside the engine."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_LENGTH = "finished_length"
    FINISHED_EOS = "finished_eos"
    FINISHED_STOP = "finished_stop"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_EOS: FinishReason.EOS_TOKEN,
    RequestStatus.FINISHED_STOP: FinishReason.STOP_SEQUENCE,
}


class SamplingParams(BaseModel):
    """Generation parameters of one request (TGI semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int | None = Field(
        None, description="Tokens to generate at most (> 0); None fills up to max_total_tokens."
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float | None = Field(None, description="Softmax temperature (> 0).")
    top_k: int | None = Field(None, description="Keep the k most likely tokens (> 0).")
    top_p: float | None = Field(None, description="Nucleus sampling mass (0 < p < 1).")
    typical_p: float | None = Field(None, description="Locally typical sampling mass (0 < p < 1).")
    repetition_penalty: float | None = Field(
        None, description="Divide logits of seen tokens (> 0, 1 = off), CTRL-style."
    )
    frequency_penalty: float | None = Field(
        None, description="Subtract penalty × count of each generated token (-2 ≤ x ≤ 2)."
    )
    seed: int | None = Field(None, description="Random seed (≥ 0); same seed and params give the same text.")
    stop: list[str] = Field(
        default_factory=list, description=f"Stop sequences (at most {MAX_STOP_SEQUENCES})."
    )
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text.")
    truncate: int | None = Field(None, description="Keep only the last `truncate` prompt tokens (> 0).")
    details: bool = Field(False, description="Return finish reason, tokens and logprobs.")
    decoder_input_details: bool = Field(
        False, description="Also return the prompt tokens with their logprobs."
    )
    top_n_tokens: int | None = Field(
        None, description=f"Return the n most likely alternatives per token (0..{MAX_TOP_N_TOKENS})."
    )
    ignore_eos: bool = Field(
        False, description="Keep generating past EOS (vLLM's extension; benchmarks use it)."
    )

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_new_tokens(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`max_new_tokens` must be strictly positive")
        return v

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("`temperature` must be strictly positive")
        return v

    @field_validator("top_k")
    @classmethod
    def _positive_top_k(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`top_k` must be strictly positive")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("`top_p` must be > 0.0 and < 1.0")
        return v

    @field_validator("typical_p")
    @classmethod
    def _typical_p_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("`typical_p` must be > 0.0 and < 1.0")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _positive_repetition(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("`repetition_penalty` must be strictly positive")
        return v

    @field_validator("frequency_penalty")
    @classmethod
    def _frequency_range(cls, v: float | None) -> float | None:
        if v is not None and not -2.0 <= v <= 2.0:
            raise ValueError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        return v

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**63:
            raise ValueError("`seed` must be >= 0 and < 2^63")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_count(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("`stop` sequences must not be empty")
        return v

    @field_validator("truncate")
    @classmethod
    def _positive_truncate(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`truncate` must be strictly positive")
        return v

    @field_validator("top_n_tokens")
    @classmethod
    def _top_n_range(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_N_TOKENS:
            raise ValueError(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}")
        return v

    @property
    def is_sampling(self) -> bool:
        """TGI samples when asked to, or when any warper would change the distribution."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or self.top_p is not None
            or self.typical_p is not None
        )


_request_counter = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_request_counter)}-{time.monotonic_ns() % 1_000_000}"


@dataclass
class GenerateRequest:
    """One generation request as the engine receives it: a prompt (text or token ids) and params."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)
    arrival_time: float = field(default_factory=time.monotonic)
    # False for prompts rendered by a chat template, which already holds BOS and friends
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.prompt is None and self.prompt_token_ids is None:
            raise ValueError("a request needs `prompt` or `prompt_token_ids`")


@dataclass(frozen=True)
class Token:
    """One token with its text (special tokens included) and log-probability."""

    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass(frozen=True)
class GenerationDetails:
    """What TGI returns under `details`, filled once a request finishes."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[Token]
    tokens: list[Token]
    top_tokens: list[list[Token]]
    prompt_tokens: int


@dataclass(frozen=True)
class TokenEvent:
    """What a stream yields per generated token.

    `text` is the visible text to append (special tokens and possible partial stop
    strings are held back), so joining `text` over a stream equals `generated_text`.
    The last event has `finished` set and carries `generated_text` and `details`,
    or `error` when the request failed.
    """

    request_id: str
    token: Token | None
    text: str
    top_tokens: list[Token] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    generated_text: str | None = None
    details: GenerationDetails | None = None
    error: TwinserveError | None = None
    # timings, seconds since arrival (filled on the final event)
    queue_time: float | None = None
    inference_time: float | None = None
