"""What `LLMClient` returns: one result type and one stream-chunk type for every wire format.

TGI and OpenAI say the same things with different names; these types say them once, so
callers (the RAG service, the load benchmark) never branch on the protocol.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

Api = Literal["tgi", "openai"]


class FinishReason(enum.StrEnum):
    """Why generation stopped, in TGI's names.

    Mapping from OpenAI: `length` → LENGTH, `stop` → STOP (OpenAI does not say whether the
    EOS token or a stop sequence ended it), anything else (`content_filter`, `tool_calls`)
    → OTHER. TGI's `eos_token` and `stop_sequence` map to themselves.
    """

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    STOP = "stop"
    OTHER = "other"

    @classmethod
    def parse(cls, value: str | None) -> FinishReason | None:
        if value is None:
            return None
        try:
            return cls(value)
        except ValueError:
            return cls.OTHER

    @property
    def is_length(self) -> bool:
        """True when the token budget (`max_new_tokens`) ended the text, i.e. it may be cut."""
        return self is FinishReason.LENGTH


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One generated token, when the server reports tokens (TGI `details`, OpenAI `logprobs`)."""

    text: str
    id: int | None = None
    logprob: float | None = None
    special: bool = False


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """A finished generation (`generate`, `chat` and their async twins).

    Token counts come from the server (`details`, `usage` or TGI's `x-*-tokens` headers);
    None when the server reported none. `request_id` is the server's `x-request-id`.
    """

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    seed: int | None = None
    request_id: str | None = None
    tokens: tuple[TokenInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One piece of a streamed generation.

    Joining every chunk's `text` gives the generated text. Exactly one chunk, the last,
    has `finished=True`; it also carries `finish_reason`, `generated_text` and the token
    counts the server reported. `token_id`/`logprob` are set when the server sends them
    (always on TGI; on OpenAI only with `logprobs`).
    """

    text: str
    index: int
    token_id: int | None = None
    logprob: float | None = None
    special: bool = False
    finished: bool = False
    finish_reason: FinishReason | None = None
    generated_text: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    seed: int | None = None
    request_id: str | None = None
