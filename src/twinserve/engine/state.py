"""The engine's per-request state. A batch is a list of these, never parallel lists."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twinserve.engine.request import GenerateRequest, RequestStatus, Token

if TYPE_CHECKING:
    from twinserve.engine.detokenizer import IncrementalDetokenizer
    from twinserve.engine.sampling import SamplingState
    from twinserve.engine.speculation import PromptLookup
    from twinserve.engine.stop import StopSequenceMatcher


@dataclass(eq=False)
class RequestState:
    """Everything the engine tracks for one request between its arrival and its end."""

    request: GenerateRequest
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingState
    seed: int | None
    detokenizer: IncrementalDetokenizer | None = None
    stop: StopSequenceMatcher | None = None
    lookup: PromptLookup | None = None  # the n-gram index drafts come from (speculation on)
    status: RequestStatus = RequestStatus.WAITING
    slot: int = -1
    num_cached: int = 0  # positions of this request held in its KV slot
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache
    output_ids: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    top_tokens: list[list[Token]] = field(default_factory=list)
    prefill_tokens: list[Token] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def reserved_tokens(self) -> int:
        """KV positions this request may need at most: it is admitted only if these fit."""
        return self.prompt_len + self.max_new_tokens

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.request.params.decoder_input_details

    @property
    def top_n(self) -> int:
        return self.request.params.top_n_tokens or 0

    def mark_scheduled(self) -> None:
        self.scheduled_time = time.monotonic()
