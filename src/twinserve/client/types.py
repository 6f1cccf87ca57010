"""What `LLMClient` returns: one result type and one stream-chunk type for every wire format,
and what the server says about itself (`ServerInfo`) and its tokenizer (`PromptToken`,
`ChatTokens`).

TGI and OpenAI say the same things with different names; these types say them once, so
callers (the RAG service, the load benchmark) never branch on the protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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


@dataclass(frozen=True, slots=True)
class PromptToken:
    """One token of a prompt as the server's tokenizer cut it (`/tokenize`, `/chat_tokenize`):
    its id, its text, and the character offsets `[start, stop)` of that text in the prompt."""

    id: int
    text: str
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class ChatTokens:
    """A conversation as the model sees it (`/chat_tokenize`): the prompt its chat template
    renders, and that prompt's tokens exactly as generation counts them, so `count` is the
    `prompt_tokens` a chat completion of the same messages reports."""

    templated_text: str
    tokens: tuple[PromptToken, ...]

    @property
    def count(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What `/info` says is served, read leniently: a field the server does not report is None.

    A TGI peer has `model_id` and the limits (`max_input_length` before TGI 2, read as
    `max_input_tokens`) but none of the registry's provenance; twinserve's server has all of
    them (`prompt_template`: "tokenizer", a built-in template's name, or "custom"). `raw` is
    the whole answer, for fields not lifted here.
    """

    model_id: str | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    registry_name: str | None = None
    registry_version: int | None = None
    prompt_template: str | None = None
    version: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)
