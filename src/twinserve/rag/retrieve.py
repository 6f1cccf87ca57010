"""Retrieval: (optional) query expansion → dense top-k with filters → (optional) rerank.

Each step is timed into the request's `Timings`, and each can be switched off per request.
The vector store is synchronous (Qdrant's local mode is in-process numpy), so searches run
on worker threads: the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twinserve.rag.embed import Embedder
from twinserve.rag.rerank import CrossEncoderReranker, mmr
from twinserve.rag.schemas import Timings
from twinserve.rag.store import Hit, VectorStore

# candidates fetched per query for the reranker to choose from
CANDIDATES_PER_RESULT = 4
MIN_CANDIDATES = 16

Expander = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class Retrieval:
    hits: list[Hit]
    queries: list[str]


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


class Retriever:
    def __init__(
        self,
        embedder: Embedder,
        store: VectorStore,
        collection: str,
        *,
        reranker: CrossEncoderReranker | None = None,
        expander: Expander | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.collection = collection
        self.reranker = reranker
        self.expander = expander

    async def retrieve(
        self,
        query: str,
        k: int,
        timings: Timings,
        *,
        filters: Mapping[str, Any] | None = None,
        expand: int = 0,
        rerank: bool = True,
    ) -> Retrieval:
        started = time.perf_counter()
        queries = [query]
        if expand and self.expander is not None:
            t = time.perf_counter()
            queries += await self.expander(query, expand)
            timings.expand_ms = _ms(t)

        t = time.perf_counter()
        vectors = await self.embedder.aembed(queries)
        timings.embed_ms = _ms(t)

        fetch = max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES) if rerank else k
        with_vectors = rerank and self.reranker is None  # MMR needs the chunks' vectors
        t = time.perf_counter()
        found = await asyncio.gather(
            *(
                asyncio.to_thread(
                    self.store.search, self.collection, v, fetch, filters, with_vectors=with_vectors
                )
                for v in vectors
            )
        )
        timings.search_ms = _ms(t)
        candidates = _merged(found)

        if rerank:
            t = time.perf_counter()
            if self.reranker is not None:
                hits = await self.reranker.arerank(query, candidates, k)
            else:
                hits = mmr(vectors[0], candidates, k)
            timings.rerank_ms = _ms(t)
        else:
            hits = candidates[:k]
        timings.retrieval_ms = _ms(started)
        return Retrieval(hits=hits, queries=queries)


def _merged(results: Sequence[Sequence[Hit]]) -> list[Hit]:
    """One list from several queries' results: each chunk once, at its best score."""
    best: dict[str, Hit] = {}
    for hits in results:
        for hit in hits:
            if hit.id not in best or hit.score > best[hit.id].score:
                best[hit.id] = hit
    return sorted(best.values(), key=lambda h: h.score, reverse=True)


_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)]|\(\d+\))\s*")

EXPAND_SYSTEM = (
    "You rewrite search queries. Write {n} different rephrasings of the user's question, "
    "each on its own line, with no numbering and no other text."
)


def parse_rephrasings(text: str, query: str, n: int) -> list[str]:
    """The LLM's lines as queries: list marks and quotes stripped, blanks and repeats dropped."""
    seen = {query.strip().lower()}
    out: list[str] = []
    for line in text.splitlines():
        candidate = _LIST_MARK.sub("", line).strip().strip('"').strip()
        if len(candidate) < 3 or candidate.lower() in seen:
            continue
        seen.add(candidate.lower())
        out.append(candidate[:4000])
        if len(out) == n:
            break
    return out
