"""Chunking by the embedding model's tokens: the limit holds, neighbours overlap, cuts fall on
paragraphs and sentences, nothing is lost, ids are content hashes."""

from __future__ import annotations

import random
import re

import pytest

from twinserve.errors import ValidationError
from twinserve.rag.chunking import Chunk, Chunker, chunk_id
from twinserve.rag.documents import Document
from twinserve.rag.embed import Embedder

# fmt: off
WORDS = [
    "engine", "scheduler", "batch", "token", "cache", "prefix", "model", "server", "route", "client",
    "request", "stream", "replica", "router", "endpoint", "policy", "metric", "latency", "queue",
    "worker", "tensor", "weight", "kernel",
]
# fmt: on


def _sentence(rng: random.Random, low: int = 4, high: int = 18) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + rng.choice(".!?")


def _doc(text: str, file: str = "/data/doc.md") -> Document:
    return Document(file=file, source="doc.md", title="Doc", text=text, metadata={"author": "ada"})


def _prose(seed: int, paragraphs: int = 12) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(_sentence(rng) for _ in range(rng.randint(1, 7))) for _ in range(paragraphs))


def _spans(text: str, chunks: list[Chunk], *, disjoint: bool = False) -> list[tuple[int, int]]:
    """Where each chunk's text lies in the document (chunks are slices of it, in order)."""
    spans, at = [], 0
    for chunk in chunks:
        start = text.find(chunk.text, at)
        assert start >= 0, f"chunk {chunk.position} is not a slice of the document"
        spans.append((start, start + len(chunk.text)))
        at = start + len(chunk.text) if disjoint else start + 1  # repeated text: search past the last
    return spans


HOSTILE = (
    "# Heading\n\n"
    + " ".join(["unpunctuated run of words that never ends"] * 60)  # one sentence far over any budget
    + "\n\n"
    + "x" * 400  # one 'word' the tokenizer keeps as a single [UNK]
    + " "
    + "supercalifragilisticexpialidocious " * 50  # a word of many word pieces, repeated
    + "\n\nShort tail. Ünïcödé çhäräctérs and emoji 🚀 are fine too."
)


@pytest.mark.parametrize(("chunk_tokens", "overlap"), [(32, 8), (64, 16), (128, 0), (254, 32)])
def test_no_chunk_exceeds_the_budget_in_model_tokens(
    embedder: Embedder, chunk_tokens: int, overlap: int
) -> None:
    chunker = Chunker(embedder.tokenizer, chunk_tokens, overlap)
    for text in (_prose(1), _prose(2, paragraphs=30), HOSTILE):
        chunks = chunker.split(_doc(text))
        assert len(chunks) > 1
        counts = [len(embedder.tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in chunks]
        assert max(counts) <= chunk_tokens, counts
        assert max(counts) > chunk_tokens // 2  # chunks are filled, not cut tiny


def test_neighbours_overlap_by_about_the_overlap(embedder: Embedder) -> None:
    chunker = Chunker(embedder.tokenizer, 64, 16)
    text = _prose(3, paragraphs=20)
    chunks = chunker.split(_doc(text))
    spans = _spans(text, chunks)
    for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert next_start < end, "neighbours share no text"
        shared = chunker.count(text[next_start:end])
        assert 1 <= shared <= 16


def test_without_overlap_the_chunks_tile_the_document(embedder: Embedder) -> None:
    chunker = Chunker(embedder.tokenizer, 48, 0)
    text = _prose(4, paragraphs=15) + "\n\n" + HOSTILE
    chunks = chunker.split(_doc(text))
    spans = _spans(text, chunks, disjoint=True)
    for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert end <= next_start and not text[end:next_start].strip()  # only whitespace between
    assert " ".join(c.text for c in chunks).split() == text.split()  # every word kept, in order


def test_cuts_fall_on_paragraphs_then_sentences(embedder: Embedder) -> None:
    rng = random.Random(5)
    paragraphs = [" ".join(_sentence(rng, 6, 10) for _ in range(3)) for _ in range(20)]  # ~30-45 tokens
    text = "\n\n".join(paragraphs)
    chunker = Chunker(embedder.tokenizer, 100, 0)
    chunks = chunker.split(_doc(text))
    assert len(chunks) >= 6
    for chunk in chunks:
        # each chunk is whole paragraphs: it starts where one starts and ends where one ends
        assert any(p.startswith(chunk.text[:30]) for p in paragraphs)
        assert any(p.endswith(chunk.text[-30:]) for p in paragraphs)

    one_paragraph = " ".join(_sentence(rng, 6, 12) for _ in range(30))  # no paragraph breaks at all
    for chunk in chunker.split(_doc(one_paragraph)):
        assert chunk.text[-1] in ".!?"  # ends at a sentence end
        assert chunk.text[0].isupper()  # starts at a sentence start


def test_overlap_starts_at_a_sentence_when_one_is_near(embedder: Embedder) -> None:
    rng = random.Random(6)
    text = " ".join(_sentence(rng, 5, 8) for _ in range(60))  # short sentences: one always fits the overlap
    chunks = Chunker(embedder.tokenizer, 80, 24).split(_doc(text))
    assert len(chunks) > 3
    assert all(chunk.text[0].isupper() for chunk in chunks)


def test_an_over_long_sentence_is_cut_at_word_boundaries(embedder: Embedder) -> None:
    words = random.Random(7).choices(WORDS + ["tokenization", "overlapping"], k=600)  # no punctuation
    text = " ".join(words)
    chunks = Chunker(embedder.tokenizer, 40, 8).split(_doc(text))
    assert len(chunks) > 10
    vocabulary = set(words)
    for chunk in chunks:
        assert set(chunk.text.split()) <= vocabulary  # no word split in two


def test_a_heading_stays_with_its_paragraph(embedder: Embedder) -> None:
    rng = random.Random(8)
    sections = [f"## Section {i}\n\n" + " ".join(_sentence(rng, 8, 12) for _ in range(3)) for i in range(12)]
    chunks = Chunker(embedder.tokenizer, 90, 0).split(_doc("\n\n".join(sections)))
    assert len(chunks) > 3
    assert not any(re.search(r"## Section \d+$", chunk.text) for chunk in chunks)  # never a heading last


def test_fields_positions_and_content_hash_ids(embedder: Embedder) -> None:
    chunker = Chunker(embedder.tokenizer, 32, 8)
    document = _doc(_prose(9))
    chunks = chunker.split(document, first_position=5)
    assert [c.position for c in chunks] == list(range(5, 5 + len(chunks)))
    first = chunks[0]
    assert (first.file, first.source, first.title, first.metadata) == (
        "/data/doc.md",
        "doc.md",
        "Doc",
        {"author": "ada"},
    )
    assert first.id == chunk_id("/data/doc.md", 5, first.text)
    assert [c.id for c in chunker.split(document, first_position=5)] == [c.id for c in chunks]  # stable
    assert len({c.id for c in chunks}) == len(chunks)
    assert (
        chunker.split(_doc(document.text, file="/data/other.md"), 5)[0].id != first.id
    )  # file is in the hash
    assert chunker.split(document, 6)[0].id != first.id  # so is the position
    assert chunker.split(_doc("   \n\n  ")) == []


def test_small_documents_are_one_chunk_trimmed(embedder: Embedder) -> None:
    [chunk] = Chunker(embedder.tokenizer, 256, 32).split(_doc("\n\n  Hello there, world.  \n"))
    assert chunk.text == "Hello there, world."


def test_bad_settings_are_refused(embedder: Embedder) -> None:
    with pytest.raises(ValidationError, match="below chunk_tokens"):
        Chunker(embedder.tokenizer, 32, 32)
    with pytest.raises(ValidationError, match="at least 1"):
        Chunker(embedder.tokenizer, 0, 0)
    with pytest.raises(ValidationError, match="fast"):
        Chunker(object(), 32, 8)
