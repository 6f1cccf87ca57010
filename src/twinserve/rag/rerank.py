"""Reranking retrieved chunks: a cross-encoder when one is configured, otherwise MMR.

Dense retrieval returns near-identical chunks side by side (the same paragraph in two files,
overlapping windows of one file); spending the prompt on copies starves the answer of
context. MMR (maximal marginal relevance) picks each next chunk by relevance minus its
similarity to what is already picked, and drops outright any candidate that is a
near-duplicate of a picked one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cache
from typing import Any

import numpy as np

from twinserve.errors import ValidationError
from twinserve.rag.store import Hit

# cosine similarity above which two chunks say the same thing (MiniLM puts re-wrapped or
# lightly edited copies of a paragraph at ~0.97-1.0, distinct paragraphs on one topic < 0.9)
DUPLICATE_SIMILARITY = 0.95
MMR_LAMBDA = 0.7  # relevance weight: 1 = plain top-k, 0 = diversity only


def mmr(
    query: np.ndarray,
    hits: Sequence[Hit],
    k: int,
    *,
    lambda_: float = MMR_LAMBDA,
    duplicate: float = DUPLICATE_SIMILARITY,
) -> list[Hit]:
    """Up to `k` of `hits` (which carry unit vectors) chosen by MMR, returned best score first."""
    candidates = [h for h in hits if h.vector is not None]
    if not candidates:
        return list(hits[:k])
    vectors = np.stack([np.asarray(h.vector, dtype=np.float32) for h in candidates])
    relevance = vectors @ np.asarray(query, dtype=np.float32)
    chosen: list[int] = []
    # best similarity of each candidate to anything chosen so far
    closest = np.full(len(candidates), -np.inf, dtype=np.float32)
    alive = np.ones(len(candidates), dtype=bool)
    while len(chosen) < k and alive.any():
        penalty = np.where(np.isfinite(closest), closest, 0.0)
        value = np.where(alive, lambda_ * relevance - (1 - lambda_) * penalty, -np.inf)
        pick = int(np.argmax(value))
        chosen.append(pick)
        alive[pick] = False
        similarity = vectors @ vectors[pick]
        closest = np.maximum(closest, similarity)
        alive &= closest < duplicate
    picked = [candidates[i] for i in chosen]
    return sorted(picked, key=lambda h: h.score, reverse=True)


class CrossEncoderReranker:
    """Scores (query, chunk) pairs with a sentence-transformers CrossEncoder, off the event loop."""

    def __init__(self, model_path: str) -> None:
        try:
            from sentence_transformers import CrossEncoder
        except ImportError as exc:
            raise ValidationError("reranking with a cross-encoder needs the [rag] extra") from exc
        try:
            self._model: Any = CrossEncoder(model_path, device="cpu", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValidationError(
                f"{model_path!r} is not a sentence-transformers cross-encoder: {exc}"
            ) from exc
        self.name = model_path
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="rerank")

    def rerank(self, query: str, hits: Sequence[Hit], k: int) -> list[Hit]:
        if not hits:
            return []
        scores = self._model.predict([(query, h.text) for h in hits], show_progress_bar=False)
        rescored = [replace(h, score=float(s)) for h, s in zip(hits, scores, strict=True)]
        return sorted(rescored, key=lambda h: h.score, reverse=True)[:k]

    async def arerank(self, query: str, hits: Sequence[Hit], k: int) -> list[Hit]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.rerank, query, hits, k)


@cache
def load_cross_encoder(model_path: str) -> CrossEncoderReranker:
    """One cross-encoder per process and folder."""
    return CrossEncoderReranker(model_path)
