"""The prompt: the question and as much retrieved context as the model's limits allow.

The limits are the LLM's own (`/info`: `max_input_tokens`, `max_total_tokens`) and tokens are
counted by the LLM's tokenizer through its routes — `/tokenize` for each passage and
`/chat_tokenize` for the whole chat as its template renders it — never by characters, so the
request the LLM receives fits: prompt + `max_new_tokens` ≤ `max_total_tokens`. Passages go in
by score; the first that does not fit is cut at a token boundary (when enough of it is left to
be useful) and the rest are left out. One final count of the rendered chat checks the estimate
(separators can merge into neighbouring tokens) and drops passages until it holds. When all
the passages fit, which is the usual case, the first count of the whole chat is the only call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace

from twinserve.client import ChatTokens, LLMClient, PromptToken
from twinserve.errors import LLMFailedError, ValidationError
from twinserve.rag.metrics import RagMetrics
from twinserve.rag.store import Hit
from twinserve.rag.upstream import llm_call

SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. Cite the passages you use as "
    "[1], [2], ... If the context does not contain the answer, say that you do not know."
)
NO_CONTEXT = "(no passages found)"
SEPARATOR_TOKENS = 2  # "\n\n" between passages, counted on top of each passage's own tokens
MIN_USEFUL_TOKENS = 24  # a passage cut shorter than this says too little to keep
TOKENIZE_CONCURRENCY = 8
MIN_PREFIX_CHARS = 64  # an over-long passage is halved until it can be tokenized, down to this


@dataclass(frozen=True)
class ModelLimits:
    max_input_tokens: int
    max_total_tokens: int


@dataclass(frozen=True)
class BuiltPrompt:
    messages: list[dict[str, str]]
    prompt_tokens: int
    used: list[Hit]
    dropped: int
    truncated: int


def passage(number: int, hit: Hit) -> str:
    return f"[{number}] {hit.title} ({hit.source})\n{hit.text}"


def chat_messages(query: str, passages: Sequence[str]) -> list[dict[str, str]]:
    context = "\n\n".join(passages) if passages else NO_CONTEXT
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {query}"},
    ]


class PromptBuilder:
    def __init__(self, llm: LLMClient, metrics: RagMetrics | None = None) -> None:
        self.llm = llm
        self.metrics = metrics
        self._tokenizing = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

    async def build(
        self, query: str, hits: Sequence[Hit], max_new_tokens: int, limits: ModelLimits
    ) -> BuiltPrompt:
        budget = min(limits.max_input_tokens, limits.max_total_tokens - max_new_tokens)
        if budget <= 0:
            raise ValidationError(
                f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt: the model takes "
                f"at most {limits.max_total_tokens} tokens in all"
            )
        blocks = [passage(i + 1, h) for i, h in enumerate(hits)]
        # the usual case, everything fits: one count of the rendered chat, no per-passage calls
        everything = await self._chat_tokens(query, blocks)
        if everything.count <= budget:
            return BuiltPrompt(chat_messages(query, blocks), everything.count, list(hits), 0, 0)
        base_count = asyncio.ensure_future(self._chat_tokens(query, []))
        try:
            counted = await asyncio.gather(*(self._tokens(b) for b in blocks))
        finally:
            base = await base_count
        if base.count > budget:
            raise ValidationError(
                f"the question is too long: {base.count} prompt tokens without any context, and the "
                f"model takes at most {budget} with max_new_tokens={max_new_tokens}"
            )
        room = budget - base.count
        chosen: list[str] = []
        used: list[Hit] = []
        truncated = 0
        for hit, block, (tokens, whole) in zip(hits, blocks, counted, strict=True):
            need = len(tokens) + SEPARATOR_TOKENS
            if whole and need <= room:
                chosen.append(block)
                used.append(hit)
                room -= need
                continue
            keep = min(room - SEPARATOR_TOKENS, len(tokens))
            header = len(block) - len(hit.text)
            cut = tokens[keep - 1].stop if keep > 0 else 0
            if keep >= MIN_USEFUL_TOKENS and cut > header:
                chosen.append(block[:cut])
                used.append(replace(hit, text=hit.text[: cut - header]))
                truncated = 1
            break
        while True:
            final = await self._chat_tokens(query, chosen)
            if final.count <= budget or not chosen:
                break
            # the estimate was off by a merged separator or two: the last passage goes (a cut
            # passage is always the last one)
            chosen.pop()
            used.pop()
            truncated = 0
        if final.count > budget:
            raise ValidationError(f"the prompt needs {final.count} tokens; the model takes at most {budget}")
        return BuiltPrompt(
            messages=chat_messages(query, chosen),
            prompt_tokens=final.count,
            used=used,
            dropped=len(hits) - len(used),
            truncated=truncated,
        )

    async def _chat_tokens(self, query: str, passages: Sequence[str]) -> ChatTokens:
        return await llm_call(self.llm.achat_tokenize(chat_messages(query, passages)), self.metrics)

    async def _tokens(self, text: str) -> tuple[list[PromptToken], bool]:
        """The passage's tokens, and whether they cover all of it. A passage longer than the
        LLM's input limit cannot be tokenized whole (`/tokenize` refuses it with a 422): its
        first half is, then the half of that, … — it cannot fit whole anyway, and a prefix is
        what a cut keeps."""
        async with self._tokenizing:
            whole = True
            while True:
                try:
                    return await llm_call(self.llm.atokenize(text), self.metrics), whole
                except LLMFailedError as exc:
                    if exc.upstream.get("status") != 422 or len(text) < 2 * MIN_PREFIX_CHARS:
                        raise
                text, whole = text[: len(text) // 2], False
