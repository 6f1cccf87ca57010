"""What a generation request is, inside the engine and out of it.

`SamplingParams` follows TGI's parameter names and semantics (a request samples when
`do_sample` is set *or* any warper — temperature ≠ 1, top_k, top_p, typical_p, min_p —
is given), with OpenAI's and vLLM's extras (presence penalty, min_p, min_tokens, stop
token ids) that the OpenAI routes expose.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from twinserve.errors import TwinserveError

# the engine's own bounds; a wire format may set tighter ones (TGI allows 5 top tokens)
MAX_TOP_N_TOKENS = 20
MAX_STOP_SEQUENCES = 4
MAX_STOP_SEQUENCE_CHARS = 256  # the matcher holds back up to this much text per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = 2**64  # exclusive: TGI's seeds are u64
MAX_TOKENS_FIELD = 2**31 - 1  # counts of tokens (top_k, max_new_tokens, ...) fit an int32

# Constrained types shared by SamplingParams and the wire schemas, so a constraint lives in
# one place and the OpenAPI document states it (exclusiveMinimum, maxLength, ...).
StrictlyPositive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
OpenProbability = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
TokenCount = Annotated[int, Field(gt=0, le=MAX_TOKENS_FIELD)]
Seed = Annotated[int, Field(ge=0, lt=MAX_SEED)]
StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_SEQUENCE_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKENS_FIELD)]


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
    """Generation parameters of one request (TGI semantics, plus OpenAI's and vLLM's extras).

    Every bound is a field constraint, so nothing out of range (NaN included) reaches
    the sampler, whoever builds the params.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_new_tokens: TokenCount | None = Field(
        None, description="Tokens to generate at most; None fills up to max_total_tokens."
    )
    min_tokens: int = Field(
        0,
        ge=0,
        le=MAX_TOKENS_FIELD,
        description="Tokens to generate before EOS, stop token ids or stop strings may end it (vLLM).",
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: StrictlyPositive | None = Field(None, description="Softmax temperature (> 0).")
    top_k: TokenCount | None = Field(None, description="Keep the k most likely tokens (> 0).")
    top_p: OpenProbability | None = Field(None, description="Nucleus sampling mass (0 < p < 1).")
    typical_p: OpenProbability | None = Field(None, description="Locally typical sampling mass (0 < p < 1).")
    min_p: float | None = Field(
        None, gt=0, le=1, description="Drop tokens below min_p × the top token's probability (vLLM)."
    )
    repetition_penalty: StrictlyPositive | None = Field(
        None, description="Divide logits of seen tokens (> 0, 1 = off), CTRL-style."
    )
    frequency_penalty: Penalty | None = Field(
        None, description="Subtract penalty × count of each generated token (-2 ≤ x ≤ 2)."
    )
    presence_penalty: Penalty | None = Field(
        None, description="Subtract penalty once from each token generated so far (-2 ≤ x ≤ 2, OpenAI)."
    )
    seed: Seed | None = Field(None, description="Random seed; same seed and params give the same text.")
    stop: list[StopSequence] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        description=f"Stop strings (at most {MAX_STOP_SEQUENCES}, each 1..{MAX_STOP_SEQUENCE_CHARS} characters).",
    )
    stop_token_ids: list[TokenId] = Field(
        default_factory=list,
        max_length=MAX_STOP_TOKEN_IDS,
        description="Token ids that end generation like EOS (vLLM).",
    )
    include_stop_str_in_output: bool = Field(
        False, description="Keep the matched stop string at the end of the text (TGI does; OpenAI doesn't)."
    )
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the text.")
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text.")
    truncate: TokenCount | None = Field(None, description="Keep only the last `truncate` prompt tokens.")
    details: bool = Field(False, description="Return finish reason, tokens and logprobs.")
    decoder_input_details: bool = Field(
        False, description="Also return the prompt tokens with their logprobs."
    )
    top_n_tokens: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_N_TOKENS,
        description=f"Return the n most likely alternatives per token (0..{MAX_TOP_N_TOKENS}).",
    )
    ignore_eos: bool = Field(
        False, description="Keep generating past EOS (vLLM's extension; benchmarks use it)."
    )

    @property
    def is_sampling(self) -> bool:
        """TGI samples when asked to, or when any warper would change the distribution."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or self.top_p is not None
            or self.typical_p is not None
            or self.min_p is not None
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
    validation_time: float | None = None  # seconds spent tokenizing and validating, once done
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
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (not prefilled again)."""


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
