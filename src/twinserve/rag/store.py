"""Chunks and their vectors in Qdrant: local mode (a folder) or a Qdrant server, one interface.

Synchronous (`qdrant_client.QdrantClient`): the service calls it through `asyncio.to_thread`,
so local-mode calls are serialized by a lock here (local mode is a SQLite file and in-memory
arrays, not safe for concurrent threads).

Payload of each point (id = the chunk's content-hash UUID):
    text, file, file_hash, source, title, position   the chunk and where it came from
    metadata                                         the user's metadata, a flat object of scalars
Filters address `source`, `title` and `file` at the top level and every other key inside
`metadata` (`{"author": "x"}` → `metadata.author`); Qdrant indexes nested keys, so nothing is
copied. Payload indexes: keyword on file, source, title; each metadata key gets one typed by
its first value (keyword, integer, float, bool) when it first appears. Local mode keeps no
indexes (it scans; fine at its size), the same calls make them on a server. Local mode's
SQLite files run in WAL mode without an fsync per point (see `_tune_local`).

The collection records the embedding model and dimension in its metadata: a collection made
with another model is refused instead of mixing two vector spaces.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twinserve.errors import BusyError, NotFoundError, UnreachableError, ValidationError

if TYPE_CHECKING:
    from qdrant_client import QdrantClient
    from qdrant_client.http import models

    from twinserve.rag.chunking import Chunk
    from twinserve.rag.settings import RagSettings

TOP_LEVEL_FIELDS = ("source", "title", "file")
_SCROLL_PAGE = 1024
_UPSERT_BATCH = 256


@dataclass(frozen=True)
class Hit:
    """One search result, best first; `vector` only when asked for (MMR needs it)."""

    id: str
    score: float
    text: str
    file: str
    source: str
    title: str
    position: int
    metadata: dict[str, Any]
    vector: np.ndarray | None = None


class VectorStore:
    """Collections of chunks in Qdrant; every failure comes out as a twinserve error."""

    def __init__(self, settings: RagSettings) -> None:
        from qdrant_client import QdrantClient

        if settings.qdrant_url:
            key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
            client = QdrantClient(url=settings.qdrant_url, api_key=key, check_compatibility=False)
        else:
            path = settings.qdrant_path.expanduser()
            path.mkdir(parents=True, exist_ok=True)
            try:
                client = QdrantClient(path=str(path), force_disable_check_same_thread=True)
            except RuntimeError as exc:
                if "already accessed" not in str(exc):
                    raise
                raise BusyError(
                    f"the Qdrant folder {path} is open in another process (a running `rag serve`?); "
                    "stop it, or use a Qdrant server (QDRANT_URL) to ingest while serving"
                ) from exc
        self._init(client)
        self.label = settings.store_label()

    @classmethod
    def from_client(cls, client: QdrantClient) -> VectorStore:
        """A store over a client the caller opened (tests, or a shared client)."""
        store = cls.__new__(cls)
        store._init(client)
        store.label = "local" if store._local else "server"
        return store

    def _init(self, client: QdrantClient) -> None:
        from qdrant_client.local.qdrant_local import QdrantLocal

        self._client = client
        self._local = isinstance(getattr(client, "_client", None), QdrantLocal)
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if self._local else contextlib.nullcontext()
        )
        self._indexed: dict[str, set[str]] = {}
        if self._local:
            for name in list(getattr(client._client, "collections", {})):
                self._tune_local(name)

    def _tune_local(self, name: str) -> None:
        """WAL and synchronous=NORMAL on a local collection's SQLite file.

        Local mode commits every point on its own; with SQLite's defaults each commit waits for
        fsync (~75 points/s here, below the embedder's pace), with WAL + NORMAL it does not
        (thousands/s). A power cut may lose the last commits, never corrupt the file, and a lost
        write is redone by the next ingest (its file hash is not there). Reached through the
        client's internals: if they change, this does nothing and writes are only slower.
        """
        collection = getattr(self._client._client, "collections", {}).get(name)
        connection = getattr(getattr(collection, "storage", None), "storage", None)
        if isinstance(connection, sqlite3.Connection):
            with self._lock:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")

    @contextlib.contextmanager
    def _call(self, name: str | None = None) -> Iterator[None]:
        """Qdrant's exceptions as ours: a missing collection 404, a refused request 422, else 503."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        with self._lock:
            try:
                yield
            except UnexpectedResponse as exc:
                if exc.status_code == 404 and name is not None:
                    raise NotFoundError(f"no collection {name!r} in {self.label}") from exc
                if exc.status_code in (400, 422):  # e.g. a filter a strict-mode server will not scan for
                    detail = exc.content.decode(errors="replace")[:300]
                    raise ValidationError(f"Qdrant ({self.label}) refused the request: {detail}") from exc
                raise UnreachableError(
                    f"Qdrant ({self.label}) answered {exc.status_code}: {exc.reason_phrase}"
                ) from exc
            except ResponseHandlingException as exc:
                raise UnreachableError(f"Qdrant ({self.label}) does not answer: {exc.source or exc}") from exc
            except ValueError as exc:  # local mode says "Collection x not found"
                if name is not None and "not found" in str(exc):
                    raise NotFoundError(f"no collection {name!r} in {self.label}") from exc
                raise
            except OSError as exc:
                raise UnreachableError(f"Qdrant ({self.label}) does not answer: {exc}") from exc

    # --- collections ----------------------------------------------------------------------------

    def ensure_collection(self, name: str, dimension: int, *, embedding_model: str) -> None:
        """Create the collection (cosine, indexed file/source/title) or check it holds this model's vectors."""
        from qdrant_client.http import models

        with self._call(name):
            if not self._client.collection_exists(name):
                self._client.create_collection(
                    name,
                    vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
                    metadata={"embedding_model": embedding_model, "dimension": dimension},
                )
                if self._local:
                    self._tune_local(name)
                self._indexed[name] = set()
                self.index_fields(name, TOP_LEVEL_FIELDS)
                return
            info = self._client.get_collection(name)
        self._indexed.setdefault(name, set(info.payload_schema or {}))
        vectors = info.config.params.vectors
        size = vectors.size if isinstance(vectors, models.VectorParams) else None
        recorded = (info.config.metadata or {}).get("embedding_model")
        if size != dimension or (recorded is not None and recorded != embedding_model):
            raise ValidationError(
                f"collection {name!r} holds vectors of {recorded or 'another model'} ({size} dimensions), "
                f"not of {embedding_model} ({dimension}); use another --collection or the same model",
                param="collection",
            )

    def index_fields(self, name: str, fields: Iterable[str]) -> None:
        """Keyword payload indexes on these fields (top-level names or metadata keys)."""
        from qdrant_client.http import models

        self._index(name, {_path(field): models.PayloadSchemaType.KEYWORD for field in fields})

    def _index(self, name: str, schema: Mapping[str, models.PayloadSchemaType]) -> None:
        known = self._indexed.setdefault(name, set())
        with self._call(name), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            for path, kind in schema.items():
                if path not in known:
                    self._client.create_payload_index(name, path, field_schema=kind, wait=True)
                    known.add(path)

    def collections(self) -> list[str]:
        with self._call():
            return sorted(c.name for c in self._client.get_collections().collections)

    def count(self, name: str) -> int:
        with self._call(name):
            return int(self._client.count(name, exact=True).count)

    # --- writes ---------------------------------------------------------------------------------

    def upsert(self, name: str, chunks: Sequence[Chunk], vectors: np.ndarray, file_hash: str) -> None:
        """Write chunks (all of one file, or of files sharing `file_hash`) with their vectors."""
        from qdrant_client.http import models

        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        self._index(name, _metadata_schema(chunks))
        rows = np.asarray(vectors, dtype=np.float32).tolist()
        with self._call(name):
            for start in range(0, len(chunks), _UPSERT_BATCH):
                part = chunks[start : start + _UPSERT_BATCH]
                self._client.upsert(
                    name,
                    points=models.Batch(
                        ids=[chunk.id for chunk in part],
                        vectors=rows[start : start + _UPSERT_BATCH],
                        payloads=[_payload(chunk, file_hash) for chunk in part],
                    ),
                    wait=True,
                )

    def delete_file(self, name: str, file: str, *, keep_hash: str | None = None) -> int:
        """Delete the file's chunks (all, or all but those written with `keep_hash`); how many went."""
        from qdrant_client.http import models

        selector = models.Filter(
            must=[_match("file", file)],
            must_not=[_match("file_hash", keep_hash)] if keep_hash is not None else None,
        )
        with self._call(name):
            doomed = int(self._client.count(name, count_filter=selector, exact=True).count)
            if doomed:
                self._client.delete(name, points_selector=models.FilterSelector(filter=selector), wait=True)
        return doomed

    # --- reads ----------------------------------------------------------------------------------

    def files(self, name: str) -> dict[str, str]:
        """file -> file_hash of every file in the collection ("" for a file whose chunks disagree,
        e.g. an ingest stopped between writing and cleaning up: it is not unchanged)."""
        seen: dict[str, str] = {}
        offset: Any = None
        with self._call(name):
            while True:
                points, offset = self._client.scroll(
                    name,
                    limit=_SCROLL_PAGE,
                    offset=offset,
                    with_payload=["file", "file_hash"],
                    with_vectors=False,
                )
                for point in points:
                    payload = point.payload or {}
                    file, digest = str(payload.get("file", "")), str(payload.get("file_hash", ""))
                    seen[file] = digest if seen.get(file, digest) == digest else ""
                if offset is None:
                    return seen

    def search(
        self,
        name: str,
        vector: np.ndarray,
        k: int,
        filters: Mapping[str, Any] | None = None,
        *,
        with_vectors: bool = False,
    ) -> list[Hit]:
        """The k nearest chunks (cosine), best first, matching every filter."""
        query_filter = build_filter(filters) if filters else None
        with self._call(name):
            answer = self._client.query_points(
                name,
                query=np.asarray(vector, dtype=np.float32).tolist(),
                limit=k,
                query_filter=query_filter,
                with_payload=True,
                with_vectors=with_vectors,
            )
        return [_hit(point, with_vectors) for point in answer.points]

    def health(self) -> None:
        """Raise UnreachableError unless the store answers."""
        with self._call():
            self._client.get_collections()

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _path(field: str) -> str:
    return field if field in TOP_LEVEL_FIELDS else f"metadata.{field}"


def _payload(chunk: Chunk, file_hash: str) -> dict[str, Any]:
    return {
        "text": chunk.text,
        "file": chunk.file,
        "file_hash": file_hash,
        "source": chunk.source,
        "title": chunk.title,
        "position": chunk.position,
        "metadata": chunk.metadata,
    }


def _metadata_schema(chunks: Sequence[Chunk]) -> dict[str, models.PayloadSchemaType]:
    from qdrant_client.http import models

    kinds = models.PayloadSchemaType
    schema: dict[str, models.PayloadSchemaType] = {}
    for chunk in chunks:
        for key, value in chunk.metadata.items():
            if f"metadata.{key}" not in schema:
                kind = (
                    kinds.BOOL
                    if isinstance(value, bool)
                    else kinds.INTEGER
                    if isinstance(value, int)
                    else kinds.FLOAT
                    if isinstance(value, float)
                    else kinds.KEYWORD
                )
                schema[f"metadata.{key}"] = kind
    return schema


def _hit(point: Any, with_vectors: bool) -> Hit:
    payload = point.payload or {}
    vector = np.asarray(point.vector, dtype=np.float32) if with_vectors and point.vector is not None else None
    return Hit(
        id=str(point.id),
        score=float(point.score),
        text=str(payload.get("text", "")),
        file=str(payload.get("file", "")),
        source=str(payload.get("source", "")),
        title=str(payload.get("title", "")),
        position=int(payload.get("position", 0)),
        metadata=dict(payload.get("metadata") or {}),
        vector=vector,
    )


# --- filters -------------------------------------------------------------------------------------


def build_filter(filters: Mapping[str, Any]) -> models.Filter:
    """`{"author": "x", "platform": ["a", "b"]}` → every key must match; a list value = any of."""
    from qdrant_client.http import models

    conditions: list[Any] = []
    for key, value in filters.items():
        if not isinstance(key, str) or not key or "." in key or "[" in key:
            raise ValidationError(
                f"filter key {key!r} must be a metadata field or source/title/file", param="filters"
            )
        path = _path(key)
        if isinstance(value, list | tuple):
            if not value:
                raise ValidationError(
                    f"filter {key!r}: an empty list matches nothing", param=f"filters.{key}"
                )
            conditions.append(_any(path, list(value), key))
        else:
            conditions.append(_match(path, value, key))
    return models.Filter(must=conditions)


def _match(path: str, value: Any, key: str | None = None) -> Any:
    from qdrant_client.http import models

    if isinstance(value, bool | str | int):
        return models.FieldCondition(key=path, match=models.MatchValue(value=value))
    if isinstance(value, float):
        return models.FieldCondition(key=path, range=models.Range(gte=value, lte=value))
    raise ValidationError(
        f"filter {key or path!r}: values must be strings, numbers or booleans (or a list of them)",
        param=f"filters.{key or path}",
    )


def _any(path: str, values: list[Any], key: str) -> Any:
    from qdrant_client.http import models

    if all(isinstance(v, str) for v in values) or all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        return models.FieldCondition(key=path, match=models.MatchAny(any=values))
    return models.Filter(should=[_match(path, value, key) for value in values])
