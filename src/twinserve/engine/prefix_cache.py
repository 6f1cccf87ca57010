"""Prefix cache across requests: the KV of earlier requests, reused by later prompts that start
with the same tokens (a multi-turn chat re-sending its history, RAG prompts sharing a system
prompt or context), so only the new suffix is prefilled.

Two kinds of source. A *cached entry* is a copy of one finished (or aborted) request's KV rows,
all layers, positions 0..n-1, with the n tokens they encode (its prompt and the answer tokens
already written). The slot cache keeps one contiguous row per running request, so entries live
beside it rather than inside it: a hit copies the matched positions into the new request's slot
(a memory copy of n × bytes-per-token, ~1 ms per 1,000 tokens of a 135M model, against ~0.3 s to
prefill them on 2 cores). Copies also make sharing trivial: any number of concurrent requests
may copy from one entry, and an abort never touches it. A *live prompt* is a running request's
prompt, once prefilled: its KV is in that request's slot, so it costs no memory and no copy
until a later prompt (a burst on one RAG context) copies from it, slot to slot. When the request
ends, its live prompt gives way to a cached entry of prompt + answer.

Lookup hashes the prompt in blocks of `BLOCK` tokens as a chain (each block's hash covers every
token before it, as vLLM's automatic prefix caching does), follows the chain as long as a block
is known, checks the matched tokens and extends the match token by token inside the source.
An entry that a newer one contains (turn 1 of a conversation, once turn 2 is cached) is
dropped. Entries are evicted least recently used whenever the running requests need the
memory: entries plus the slot cache stay within `max_batch_total_tokens`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from twinserve.engine.request import RequestStatus

if TYPE_CHECKING:
    from twinserve.engine.state import RequestState

BLOCK = 16
# shorter matches are not worth a separate prefill pass
MIN_HIT_TOKENS = 16


def block_hashes(tokens: Sequence[int]) -> list[int]:
    """Chain hashes of the full blocks of `tokens`: hash k covers tokens[0 : (k+1)·BLOCK]."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        previous = hash((previous, tuple(tokens[start : start + BLOCK])))
        hashes.append(previous)
    return hashes


@dataclass(eq=False)
class CachedPrefix:
    """One entry: `tokens` and their KV, [layers, 2, kv_heads, len(tokens), head_dim]."""

    tokens: list[int]
    kv: torch.Tensor
    hashes: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(eq=False)
class LivePrefix:
    """A running request's prefilled prompt: its KV is in `owner`'s slot of the slot cache."""

    owner: RequestState
    hashes: list[int]

    @property
    def tokens(self) -> list[int]:
        return self.owner.prompt_ids

    @property
    def length(self) -> int:
        return self.owner.prompt_len

    @property
    def usable(self) -> bool:
        """Still running with its prompt in its slot (a request failing mid-answer stays
        registered until the next lookup sees it has ended)."""
        owner = self.owner
        return owner.status is RequestStatus.RUNNING and owner.slot >= 0 and owner.num_cached >= self.length


@dataclass(frozen=True)
class PrefixHit:
    entry: CachedPrefix | LivePrefix
    tokens: int
    """Positions of the prompt whose KV the source holds."""


class PrefixCache:
    """Entries by block hash, in LRU order; counts what it was asked and what it served."""

    def __init__(self) -> None:
        self._lru: OrderedDict[int, CachedPrefix] = OrderedDict()  # id(entry) → entry, oldest first
        self._by_hash: dict[int, CachedPrefix] = {}
        self._live: dict[int, LivePrefix] = {}  # block hash → the newest running prompt holding it
        self._live_of: dict[int, LivePrefix] = {}  # id(owner) → its live prompt
        self.tokens_held = 0
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, prompt: Sequence[int], limit: int, *, count: bool = True) -> PrefixHit | None:
        """The longest known prefix of `prompt`, at most `limit` tokens (≥ MIN_HIT_TOKENS), from a
        cached entry or a live prompt (the entry when both hold as much: it needs no live slot)."""
        if count:
            self.queries += 1
            self.queried_tokens += len(prompt)
        hit = _longer(
            _walk(self._by_hash, prompt, limit),
            _walk(self._live, prompt, limit) if self._live else None,
        )
        if hit is None:
            return None
        if isinstance(hit.entry, CachedPrefix):
            self._lru.move_to_end(id(hit.entry))
        if count:
            self.hits += 1
            self.hit_tokens += hit.tokens
        return hit

    def add_live(self, owner: RequestState) -> None:
        """Let later prompts reuse `owner`'s prompt, just prefilled, from its slot."""
        if owner.prompt_len < MIN_HIT_TOKENS or id(owner) in self._live_of:
            return
        live = LivePrefix(owner=owner, hashes=block_hashes(owner.prompt_ids))
        self._live_of[id(owner)] = live
        for h in live.hashes:
            self._live[h] = live  # the newest prompt answers for a block both hold

    def drop_live(self, owner: RequestState) -> None:
        """`owner` is ending: its slot is about to hold another request. Live prompts of
        requests that ended without it (a failed pass) go too."""
        ended = [v for v in self._live_of.values() if v.owner is owner or v.owner.status.is_finished]
        for live in ended:
            del self._live_of[id(live.owner)]
            for h in live.hashes:
                if self._live.get(h) is live:
                    del self._live[h]

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether one cached entry already holds KV for all of `tokens` (a prompt sent again)."""
        hit = _walk(self._by_hash, tokens, len(tokens))
        return hit is not None and hit.tokens == len(tokens)

    def insert(self, tokens: list[int], kv: torch.Tensor) -> CachedPrefix | None:
        """Cache `kv` for `tokens` (the caller makes room first); entries it contains are dropped."""
        if len(tokens) < MIN_HIT_TOKENS:
            return None
        contained = _walk(self._by_hash, tokens, len(tokens))
        if (
            contained is not None
            and isinstance(contained.entry, CachedPrefix)
            and contained.tokens >= contained.entry.length
        ):
            self.remove(contained.entry)
        entry = CachedPrefix(tokens=tokens, kv=kv, hashes=block_hashes(tokens))
        for h in entry.hashes:
            self._by_hash[h] = entry  # the newest entry answers for a block both hold
        self._lru[id(entry)] = entry
        self.tokens_held += entry.length
        return entry

    def remove(self, entry: CachedPrefix) -> None:
        if self._lru.pop(id(entry), None) is None:
            return
        for h in entry.hashes:
            if self._by_hash.get(h) is entry:
                del self._by_hash[h]
        self.tokens_held -= entry.length

    def evict_to(self, max_tokens: int) -> int:
        """Drop least recently used entries until at most `max_tokens` are held; returns how many."""
        dropped = 0
        while self._lru and self.tokens_held > max_tokens:
            _, oldest = next(iter(self._lru.items()))
            self.remove(oldest)
            dropped += 1
        return dropped

    def clear(self) -> None:
        self._lru.clear()
        self._by_hash.clear()
        self._live.clear()
        self._live_of.clear()
        self.tokens_held = 0


def _walk(
    index: dict[int, CachedPrefix] | dict[int, LivePrefix], prompt: Sequence[int], limit: int
) -> PrefixHit | None:
    """Follow `prompt`'s block chain through `index`, then extend token by token in the source."""
    best: CachedPrefix | LivePrefix | None = None
    matched = 0
    previous = 0
    for start in range(0, min(len(prompt), limit) - BLOCK + 1, BLOCK):
        previous = hash((previous, tuple(prompt[start : start + BLOCK])))
        source = index.get(previous)
        if source is None or (isinstance(source, LivePrefix) and not source.usable):
            break
        best, matched = source, start + BLOCK
    if best is None or list(best.tokens[:matched]) != list(prompt[:matched]):  # a hash collision
        return None
    tokens = best.tokens
    end = min(limit, best.length, len(prompt))
    while matched < end and tokens[matched] == prompt[matched]:
        matched += 1
    return PrefixHit(best, matched) if matched >= MIN_HIT_TOKENS else None


def _longer(entry: PrefixHit | None, live: PrefixHit | None) -> PrefixHit | None:
    if entry is None or (live is not None and live.tokens > entry.tokens):
        return live
    return entry
