"""Files into a collection, idempotently: read, chunk, embed in batches across files, write.

A file's hash covers its bytes and everything that shapes its chunks (chunk size, overlap,
embedding model, metadata, the chunker's version), so a file whose hash is already stored is
skipped (re-ingest changes nothing). A changed file's new chunks are written first and its old
ones deleted after, so a search never finds the file missing. `prune` deletes the chunks of
files under the given paths that this run did not find (deleted or renamed files).

Embedding is the cost (tens of milliseconds per chunk on a CPU), so chunks of several files
are embedded together, sorted by length so a batch pads little.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twinserve.rag.chunking import Chunk, Chunker
from twinserve.rag.documents import check_metadata, discover, load_file, source_of
from twinserve.rag.embed import Embedder
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import VectorStore

# bump when chunking changes its cuts: every file is then re-chunked on the next ingest
CHUNKER_VERSION = 1


@dataclass
class IngestReport:
    """What one ingest did; `chunks` counts chunks embedded and written by this run."""

    collection: str = ""
    files: int = 0
    unchanged: int = 0
    added: int = 0
    replaced: int = 0
    pruned: int = 0
    chunks: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def embeddings_per_s(self) -> float:
        return self.chunks / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "embeddings_per_s": round(self.embeddings_per_s, 1)}


class IngestProgress(Protocol):
    """What a progress display hears (the CLI's rich bar); every call comes from the ingesting thread."""

    def start(self, files: int) -> None: ...

    def file_read(self, source: str, chunks: int, *, unchanged: bool) -> None: ...

    def embedded(self, chunks: int, seconds: float) -> None: ...


@dataclass
class _Pending:
    file: str
    digest: str
    replaces: bool
    chunks: list[Chunk] = field(default_factory=list)


class Ingestor:
    """Runs ingests into one store with one embedder (both loaded once by the caller)."""

    def __init__(self, settings: RagSettings, embedder: Embedder, store: VectorStore) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        # a chunk the model would truncate is never made: its limit counts [CLS] and [SEP] too
        self.chunk_tokens = min(settings.chunk_tokens, embedder.max_tokens - embedder.special_tokens)
        self.overlap = min(settings.chunk_overlap, self.chunk_tokens - 1)
        self.chunker = Chunker(embedder.tokenizer, self.chunk_tokens, self.overlap)
        # enough chunks per embedding round to sort by length and keep the batches full
        self._flush_at = max(4 * embedder.batch_size, 256)

    def file_hash(self, data: bytes, meta: Mapping[str, Any]) -> str:
        """The file's identity for re-ingest: its bytes and everything that decides its chunks."""
        recipe = {
            "chunker": CHUNKER_VERSION,
            "chunk_tokens": self.chunk_tokens,
            "overlap": self.overlap,
            "model": self.embedder.name,
            "meta": dict(meta),
        }
        digest = hashlib.sha256(data)
        digest.update(json.dumps(recipe, sort_keys=True).encode())
        return digest.hexdigest()

    def ingest(
        self,
        paths: Sequence[Path],
        *,
        collection: str | None = None,
        meta: Mapping[str, Any] | None = None,
        prune: bool = False,
        progress: IngestProgress | None = None,
    ) -> IngestReport:
        """Bring the collection up to date with the files under `paths`."""
        started = time.perf_counter()
        name = collection or self.settings.collection
        user_meta = check_metadata(meta or {}, "--meta")
        found = discover(paths)
        report = IngestReport(collection=name, files=len(found))
        if progress:
            progress.start(len(found))
        self.store.ensure_collection(name, self.embedder.dimension, embedding_model=self.embedder.name)
        stored = self.store.files(name)
        pending: list[_Pending] = []
        for file, root in found:
            key = str(file)
            digest = self.file_hash(_read(file), user_meta)
            if stored.get(key) == digest:
                report.unchanged += 1
                if progress:
                    progress.file_read(source_of(file, root), 0, unchanged=True)
                continue
            item = _Pending(key, digest, replaces=key in stored)
            for document in load_file(file, root, user_meta):
                item.chunks.extend(self.chunker.split(document, first_position=len(item.chunks)))
            pending.append(item)
            if progress:
                progress.file_read(source_of(file, root), len(item.chunks), unchanged=False)
            if sum(len(p.chunks) for p in pending) >= self._flush_at:
                self._write(name, pending, report, progress)
                pending = []
        self._write(name, pending, report, progress)
        if prune:
            self._prune(name, paths, {str(file) for file, _ in found}, stored, report)
        report.seconds = time.perf_counter() - started
        return report

    def _write(
        self, name: str, pending: list[_Pending], report: IngestReport, progress: IngestProgress | None
    ) -> None:
        chunks = [chunk for item in pending for chunk in item.chunks]
        vectors = self._embed([chunk.text for chunk in chunks], report, progress)
        start = 0
        for item in pending:
            count = len(item.chunks)
            if count:
                self.store.upsert(name, item.chunks, vectors[start : start + count], item.digest)
                start += count
                report.chunks += count
            if item.replaces:
                self.store.delete_file(name, item.file, keep_hash=item.digest if count else None)
                report.replaced += 1
            elif count:
                report.added += 1

    def _embed(self, texts: list[str], report: IngestReport, progress: IngestProgress | None) -> Any:
        """Vectors in the order of `texts`, embedded shortest first one batch at a time."""
        import numpy as np

        vectors = np.zeros((len(texts), self.embedder.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        size = self.embedder.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            began = time.perf_counter()
            vectors[batch] = self.embedder.embed([texts[i] for i in batch])
            seconds = time.perf_counter() - began
            report.embed_seconds += seconds
            if progress:
                progress.embedded(len(batch), seconds)
        return vectors

    def _prune(
        self,
        name: str,
        paths: Sequence[Path],
        seen: set[str],
        stored: Mapping[str, str],
        report: IngestReport,
    ) -> None:
        roots = [Path(path).expanduser().resolve() for path in paths]
        for file in stored:
            if file in seen:
                continue
            path = Path(file)
            if any(path == root or root in path.parents for root in roots):
                self.store.delete_file(name, file)
                report.pruned += 1


def _read(file: Path) -> bytes:
    from twinserve.errors import ValidationError

    try:
        return file.read_bytes()
    except OSError as exc:
        raise ValidationError(f"{file}: cannot be read ({exc.strerror or exc})") from exc
