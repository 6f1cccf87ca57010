"""Prompt-lookup speculative decoding: draft tokens copied from the request's own text.

When an answer quotes its prompt (summaries, extraction, code edits, RAG answers citing the
context), the tokens after the last few generated ones have usually appeared before, right
after the same few tokens. `PromptLookup` finds the latest earlier occurrence of the text's
last n tokens (the longest n from `MAX_NGRAM` down to `MIN_NGRAM` = 2 that occurs) and proposes
the tokens that followed it; the runner verifies up to N of them in one forward pass and
keeps the longest prefix the model agrees with, plus the model's own next token. Nothing is
drafted by a second model (vLLM's `ngram` method, TGI's `--speculate` without Medusa heads).

Only greedy rows without penalties speculate: their next token is the argmax of the raw
logits, which the verifying pass computes for every drafted position at once, so the output
is the one plain decoding produces. Sampled or penalized rows decode one token per step as
before, which keeps their distribution exactly as it was (no rejection sampling needed).

The lookup is an index from each n-gram to the position after its latest occurrence, updated
as tokens arrive (a few dict writes per token), so proposing costs no scan of the history.
"""

from __future__ import annotations

from collections.abc import Sequence

# the longest and shortest suffix matched against the history: longer matches propose better
# drafts. A 1-token match is not enough: its drafts are mostly wrong, and a verifying pass that
# keeps none costs ~20% more than the plain step (bf16 copy workload, 6 requests: 1.30x with
# 1-token matches, 1.49-1.54x without; 3 as the minimum gave 1.58x on copy but less on chat)
MAX_NGRAM = 3
MIN_NGRAM = 2


class PromptLookup:
    """The request's tokens so far (prompt, then answer) and where each n-gram last occurred."""

    def __init__(self, prompt_ids: Sequence[int]) -> None:
        self.tokens: list[int] = []
        # n → {n-gram: index of the token that followed its latest occurrence}
        self._next: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(MIN_NGRAM, MAX_NGRAM + 1)}
        for token in prompt_ids:
            self.append(token)

    def append(self, token_id: int) -> None:
        """Record the next token: the n-grams ending just before it now have a continuation."""
        tokens = self.tokens
        end = len(tokens)
        for n, index in self._next.items():
            if end >= n:
                index[tuple(tokens[end - n :])] = end
        tokens.append(token_id)

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the text's
        longest matching suffix; [] when no suffix of MIN_NGRAM.. tokens occurred before."""
        tokens = self.tokens
        if limit <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(tokens)), MIN_NGRAM - 1, -1):
            start = self._next[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + limit]
        return []


def accepted_length(drafts: Sequence[int], targets: Sequence[int]) -> int:
    """How many drafts the model agrees with: the longest prefix where draft j equals the
    model's greedy token at the position before it (`targets[j]`)."""
    n = 0
    for draft, target in zip(drafts, targets, strict=False):
        if draft != target:
            break
        n += 1
    return n
