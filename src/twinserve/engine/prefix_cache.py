"""Prefix cache across requests: the KV of finished requests, reused by later prompts that start
with the same tokens (a multi-turn chat re-sending its history, RAG prompts sharing a system
prompt or context), so only the new suffix is prefilled.

An entry is a copy of one finished (or aborted) request's KV rows, all layers, positions
0..n-1, with the n tokens they encode (its prompt and the answer tokens already written). The
slot cache keeps one contiguous row per running request, so entries live beside it rather
than inside it: a hit copies the matched positions into the new request's slot (a memory copy
of n × bytes-per-token, ~1 ms per 1,000 tokens of a 135M model, against ~0.3 s to prefill
them on 2 cores). Copies also make sharing trivial: any number of concurrent requests may copy
from one entry, and an abort never touches it.

Lookup hashes the prompt in blocks of `BLOCK` tokens as a chain (each block's hash covers every
token before it, as vLLM's automatic prefix caching does), follows the chain as long as a block
is cached, checks the matched tokens and extends the match token by token inside the entry.
An entry that a newer one contains (turn 1 of a conversation, once turn 2 is cached) is
dropped. Entries are evicted least recently used whenever the running requests need the
memory: entries plus the slot cache stay within `max_batch_total_tokens`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

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


@dataclass(frozen=True)
class PrefixHit:
    entry: CachedPrefix
    tokens: int
    """Positions of the prompt whose KV the entry holds."""


class PrefixCache:
    """Entries by block hash, in LRU order; counts what it was asked and what it served."""

    def __init__(self) -> None:
        self._lru: OrderedDict[int, CachedPrefix] = OrderedDict()  # id(entry) → entry, oldest first
        self._by_hash: dict[int, CachedPrefix] = {}
        self.tokens_held = 0
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, prompt: Sequence[int], limit: int, *, count: bool = True) -> PrefixHit | None:
        """The longest cached prefix of `prompt`, at most `limit` tokens (≥ MIN_HIT_TOKENS)."""
        if count:
            self.queries += 1
            self.queried_tokens += len(prompt)
        best: CachedPrefix | None = None
        matched = 0
        previous = 0
        for start in range(0, min(len(prompt), limit) - BLOCK + 1, BLOCK):
            previous = hash((previous, tuple(prompt[start : start + BLOCK])))
            entry = self._by_hash.get(previous)
            if entry is None:
                break
            best, matched = entry, start + BLOCK
        if best is None or list(best.tokens[:matched]) != list(prompt[:matched]):  # a hash collision
            return None
        end = min(limit, best.length, len(prompt))
        while matched < end and best.tokens[matched] == prompt[matched]:
            matched += 1
        if matched < MIN_HIT_TOKENS:
            return None
        self._lru.move_to_end(id(best))
        if count:
            self.hits += 1
            self.hit_tokens += matched
        return PrefixHit(best, matched)

    def insert(self, tokens: list[int], kv: torch.Tensor) -> CachedPrefix | None:
        """Cache `kv` for `tokens` (the caller makes room first); entries it contains are dropped."""
        if len(tokens) < MIN_HIT_TOKENS:
            return None
        contained = self.match(tokens, len(tokens), count=False)
        if contained is not None and contained.tokens >= contained.entry.length:
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
        self.tokens_held = 0
