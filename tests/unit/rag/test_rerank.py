"""Reranking: MMR over the chunks' vectors, and a real (tiny, random) cross-encoder."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from twinserve.rag.embed import Embedder
from twinserve.rag.rerank import CrossEncoderReranker, mmr
from twinserve.rag.retrieve import Retriever
from twinserve.rag.schemas import Timings
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import Hit, VectorStore


def _hit(name: str, vector: list[float], score: float) -> Hit:
    v = np.asarray(vector, dtype=np.float32)
    return Hit(name, score, name, f"/{name}", name, name, 0, {}, v / np.linalg.norm(v))


def test_mmr_drops_near_duplicates_and_keeps_score_order() -> None:
    query = np.asarray([1.0, 0.0, 0.0], dtype=np.float32)
    hits = [
        _hit("a", [1.0, 0.1, 0.0], 0.99),
        _hit("a-copy", [1.0, 0.1, 0.001], 0.98),  # cosine ~1 with a
        _hit("b", [0.8, 0.0, 0.6], 0.80),
        _hit("c", [0.7, 0.7, 0.0], 0.70),
    ]
    picked = mmr(query, hits, 3)
    assert [h.id for h in picked] == ["a", "b", "c"]
    assert [h.id for h in mmr(query, hits, 3, duplicate=1.01)][:2] == ["a", "a-copy"]  # no drop: plain MMR


def test_mmr_prefers_another_topic_over_a_second_chunk_of_the_same_one() -> None:
    query = np.asarray([1.0, 1.0, 0.0], dtype=np.float32)
    hits = [
        _hit("x1", [1.0, 0.2, 0.0], 0.9),
        _hit("x2", [1.0, 0.3, 0.0], 0.89),  # close to x1 (0.99) but under the duplicate line
        _hit("y", [0.1, 1.0, 0.0], 0.85),
    ]
    picked = {h.id for h in mmr(query, hits, 2, lambda_=0.5, duplicate=0.999)}
    assert "y" in picked and len(picked & {"x1", "x2"}) == 1  # one of the two x's, then the other topic
    assert {h.id for h in mmr(query, hits, 2, lambda_=1.0, duplicate=0.999)} == {"x1", "x2"}  # plain top-2


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer BERT cross-encoder with MiniLM's tokenizer, saved as a local folder."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("cross-encoder")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=1,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(path)
    bundled = Path(RagSettings(qdrant_url=None).embedding_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled / name, path / name)
    return path


def test_a_configured_cross_encoder_orders_the_results_by_its_scores(
    cross_encoder_dir: Path, embedder: Embedder, store: VectorStore, corpus: Path
) -> None:
    from twinserve.rag.ingest import Ingestor

    settings = RagSettings(qdrant_url=None, qdrant_path=Path("unused"))
    Ingestor(settings, embedder, store).ingest([corpus])
    reranker = CrossEncoderReranker(str(cross_encoder_dir))
    retriever = Retriever(embedder, store, settings.collection, reranker=reranker)
    timings = Timings()
    found = asyncio.run(retriever.retrieve("how do I bake bread?", 3, timings))
    assert len(found.hits) == 3 and timings.rerank_ms is not None
    expected = reranker._model.predict([("how do I bake bread?", h.text) for h in found.hits])
    assert [h.score for h in found.hits] == pytest.approx([float(s) for s in expected], abs=1e-5)
    assert [h.score for h in found.hits] == sorted((h.score for h in found.hits), reverse=True)


def test_a_folder_that_is_no_cross_encoder_is_a_clear_error(tmp_path: Path) -> None:
    from twinserve.errors import ValidationError

    with pytest.raises(ValidationError, match="cross-encoder"):
        CrossEncoderReranker(str(tmp_path))
