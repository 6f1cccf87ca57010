"""Documents to chunks, cut by tokens of the embedding model's own tokenizer.

Characters are a poor proxy for what the model sees (the embedding model truncates at
`max_seq_length` tokens and silently drops the rest), so a chunk is a run of at most
`chunk_tokens` tokens (without special tokens). The document is tokenized once with offsets;
each gap between two tokens is a possible cut, scored: paragraph break > sentence end > line
break > word boundary; never inside a word unless one word is longer than a chunk. A chunk
ends at the best cut in the second half of its token budget (the latest among equals), and
the next one starts at the best cut within the last `overlap` tokens, so neighbours share
~`overlap` tokens, preferably whole sentences.

A chunk's text is a slice of the document (its own formatting kept), re-tokenized once to
check the limit holds for tokenizers whose tokens depend on context (byte-level BPE).
Ids are content hashes (file, position, text): the same file chunked again gives the same ids.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any

from twinserve.errors import ValidationError
from twinserve.rag.documents import Document

TOKEN, WORD, LINE, SENTENCE, PARAGRAPH = 0, 1, 2, 3, 4
_PARAGRAPH_GAP = re.compile(r"\n[^\S\n]*\n")
_CLOSERS = "\"')]}»”’*_`"
_SENTENCE_END = ".!?…。！？"


@dataclass(frozen=True)
class Chunk:
    """A piece of one document, as stored: its text, where it came from, and its place in the file."""

    id: str
    text: str
    file: str
    source: str
    title: str
    position: int
    metadata: dict[str, Any]


def chunk_id(file: str, position: int, text: str) -> str:
    """A UUID (Qdrant's id type) from sha256(file, position, text): equal content, equal id."""
    digest = hashlib.sha256(f"{file}\0{position}\0{text}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16]))


class Chunker:
    """Cuts documents into overlapping token windows on the best boundaries available."""

    def __init__(self, tokenizer: Any, chunk_tokens: int, overlap: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValidationError(
                "chunking needs a fast (Rust) Hugging Face tokenizer: it reads token offsets"
            )
        if chunk_tokens < 1:
            raise ValidationError(
                f"chunk_tokens must be at least 1 (got {chunk_tokens})", param="chunk_tokens"
            )
        if not 0 <= overlap < chunk_tokens:
            raise ValidationError(
                f"overlap must be at least 0 and below chunk_tokens ({chunk_tokens}); got {overlap}",
                param="chunk_overlap",
            )
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap

    def count(self, text: str) -> int:
        """Tokens of `text` as the embedding model sees it, without special tokens."""
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def split(self, document: Document, first_position: int = 0) -> list[Chunk]:
        """The document's chunks in order; positions count on from `first_position` (JSONL lines
        share one file, so their chunks share one position sequence)."""
        text = document.text
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets: list[tuple[int, int]] = [tuple(pair) for pair in encoding["offset_mapping"]]
        if not offsets:
            return []
        cuts = _cut_scores(text, offsets)
        spans: list[tuple[int, int]] = []
        start, previous_end, n = 0, 0, len(offsets)
        while True:
            end = self._fit(text, offsets, start, self._end(cuts, start, previous_end, n))
            spans.append((start, end))
            if end >= n:
                break
            start, previous_end = self._next_start(cuts, start, end), end
        chunks = []
        for index, (first, last) in enumerate(spans):
            piece = text[offsets[first][0] : offsets[last - 1][1]]
            position = first_position + index
            chunks.append(
                Chunk(
                    id=chunk_id(document.file, position, piece),
                    text=piece,
                    file=document.file,
                    source=document.source,
                    title=document.title,
                    position=position,
                    metadata=dict(document.metadata),
                )
            )
        return chunks

    def _end(self, cuts: list[int], start: int, previous_end: int, n: int) -> int:
        """Where the chunk starting at token `start` ends (exclusive)."""
        limit = min(n, start + self.chunk_tokens)
        if limit == n:
            return n
        low = max(start + self.chunk_tokens // 2, previous_end)
        best = _best(cuts, low + 1, limit, latest=True)
        if best is None:  # no boundary in the second half: take any word boundary after the last chunk
            best = _best(cuts, previous_end + 1, limit, latest=True)
        return best if best is not None else limit

    def _next_start(self, cuts: list[int], start: int, end: int) -> int:
        """Where the next chunk starts: the best cut within the last `overlap` tokens."""
        if self.overlap == 0:
            return end
        low, high = max(start + 1, end - self.overlap), max(start + 1, end - self.overlap // 4)
        best = _best(cuts, low, min(high, end - 1), latest=False)
        return best if best is not None else low

    def _fit(self, text: str, offsets: list[tuple[int, int]], start: int, end: int) -> int:
        """Shrink `end` until the slice re-tokenizes within the budget (context-dependent tokenizers)."""
        while end - start > 1:
            excess = self.count(text[offsets[start][0] : offsets[end - 1][1]]) - self.chunk_tokens
            if excess <= 0:
                break
            end = max(start + 1, end - excess)
        return end


def _best(cuts: list[int], low: int, high: int, *, latest: bool) -> int | None:
    """The token index in [low, high] with the highest cut score (at least WORD), latest or earliest."""
    best, best_score = None, WORD - 1
    indices = range(high, low - 1, -1) if latest else range(low, high + 1)
    for index in indices:
        if cuts[index] > best_score:
            best, best_score = index, cuts[index]
            if best_score == PARAGRAPH:
                break
    return best


def _cut_scores(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """score[i]: how good a cut is just before token i (score[n] = the end of the text)."""
    scores = [PARAGRAPH] * (len(offsets) + 1)
    for i in range(1, len(offsets)):
        before, after = offsets[i - 1][1], offsets[i][0]
        gap = text[before:after]
        if not gap.isspace():
            scores[i] = TOKEN  # inside a word, or next to punctuation
        elif _PARAGRAPH_GAP.search(gap):
            scores[i] = LINE if _is_heading(text, before) else PARAGRAPH  # keep a heading with its text
        elif _ends_sentence(text, before):
            scores[i] = SENTENCE
        elif "\n" in gap:
            scores[i] = LINE
        else:
            scores[i] = WORD
    return scores


def _ends_sentence(text: str, end: int) -> bool:
    while end > 0 and text[end - 1] in _CLOSERS:
        end -= 1
    return end > 0 and text[end - 1] in _SENTENCE_END


def _is_heading(text: str, line_end: int) -> bool:
    line = text[text.rfind("\n", 0, line_end) + 1 : line_end]
    return line.startswith("#")
