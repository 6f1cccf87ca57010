"""Concurrent query embeddings share forward passes and get the vectors they would alone."""

from __future__ import annotations

import asyncio

import numpy as np

from twinserve.rag.embed import Embedder

QUERIES = [f"question number {i} about green tea and bicycles" for i in range(20)]


def test_concurrent_queries_are_embedded_in_one_pass_with_the_same_vectors(embedder: Embedder) -> None:
    alone = np.stack([embedder.embed([q])[0] for q in QUERIES])
    before = embedder.forward_calls

    async def together() -> list[np.ndarray]:
        return list(await asyncio.gather(*(embedder.aembed([q]) for q in QUERIES)))

    vectors = asyncio.run(together())
    assert embedder.forward_calls - before == 1  # all 20 arrived before the first pass started
    assert all(v.shape == (1, embedder.dimension) for v in vectors)
    cosine = np.sum(np.concatenate(vectors) * alone, axis=1)
    assert cosine.min() > 0.999  # each caller got its own query's vector back, in order


def test_a_failed_pass_fails_its_callers_and_the_next_call_still_works(embedder: Embedder) -> None:
    async def run() -> None:
        bad = embedder.aembed([None])  # type: ignore[list-item]
        good = embedder.aembed(["fine"])
        results = await asyncio.gather(bad, good, return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)  # one pass, one failure for both
        again = await embedder.aembed(["fine"])
        assert again.shape == (1, embedder.dimension)

    asyncio.run(run())
