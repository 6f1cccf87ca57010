"""VectorStore on real Qdrant local mode: collections guarded by model, writes, deletes, search with
filters, twinserve errors for a missing collection, an unreachable server and a folder held by
another process."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from twinserve.errors import BusyError, NotFoundError, UnreachableError, ValidationError
from twinserve.rag.chunking import Chunk, chunk_id
from twinserve.rag.embed import Embedder
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import VectorStore, build_filter

TEXTS = [
    (
        "Sourdough bread needs a lively starter.",
        "/c/bread.md",
        {"author": "ada", "year": 2024, "draft": False},
    ),
    ("Bake the loaf in a hot Dutch oven.", "/c/bread.md", {"author": "ada", "year": 2024, "draft": False}),
    ("Patch a bicycle inner tube with glue.", "/c/bike.md", {"author": "linus", "year": 2023, "draft": True}),
    ("Tomatoes need sun and a stake.", "/c/garden.md", {"author": "grace", "year": 2022, "rating": 4.5}),
]


def _chunks() -> list[Chunk]:
    chunks = []
    for position, (text, file, meta) in enumerate(TEXTS):
        source = Path(file).name
        chunks.append(
            Chunk(chunk_id(file, position, text), text, file, source, source.upper(), position, meta)
        )
    return chunks


@pytest.fixture
def filled(store: VectorStore, embedder: Embedder) -> VectorStore:
    store.ensure_collection("docs", embedder.dimension, embedding_model=embedder.name)
    chunks = _chunks()
    for file in sorted({c.file for c in chunks}):
        mine = [c for c in chunks if c.file == file]
        store.upsert("docs", mine, embedder.embed([c.text for c in mine]), f"hash-{Path(file).stem}")
    return store


def _search(store: VectorStore, embedder: Embedder, query: str, k: int = 10, **filters: object) -> list[str]:
    return [hit.text for hit in store.search("docs", embedder.embed([query])[0], k, filters or None)]


def test_search_best_first_with_the_payload_back(filled: VectorStore, embedder: Embedder) -> None:
    hits = filled.search("docs", embedder.embed(["how do I bake bread"])[0], 3, with_vectors=True)
    assert {h.text for h in hits[:2]} == {TEXTS[0][0], TEXTS[1][0]}  # both bread chunks first
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    best = next(h for h in hits if h.text == TEXTS[0][0])
    assert (best.file, best.source, best.title, best.position) == ("/c/bread.md", "bread.md", "BREAD.MD", 0)
    assert best.metadata == {"author": "ada", "year": 2024, "draft": False}
    assert best.id == _chunks()[0].id
    assert best.vector is not None and best.vector.dtype == np.float32
    # the stored vector is the text's (bf16 on this CPU: a batch of another shape moves it ~1e-3)
    assert float(best.vector @ embedder.embed([TEXTS[0][0]])[0]) > 0.999
    assert filled.search("docs", embedder.embed(["x"])[0], 2)[0].vector is None  # only when asked
    assert filled.count("docs") == 4


def test_filters_exact_any_of_top_level_and_typed(filled: VectorStore, embedder: Embedder) -> None:
    query = "anything"
    assert set(_search(filled, embedder, query, author="ada")) == {TEXTS[0][0], TEXTS[1][0]}
    assert set(_search(filled, embedder, query, author=["linus", "grace"])) == {TEXTS[2][0], TEXTS[3][0]}
    assert set(_search(filled, embedder, query, year=[2023, 2022])) == {TEXTS[2][0], TEXTS[3][0]}
    assert _search(filled, embedder, query, draft=True) == [TEXTS[2][0]]
    assert _search(filled, embedder, query, rating=4.5) == [TEXTS[3][0]]
    assert _search(filled, embedder, query, source="bike.md") == [TEXTS[2][0]]
    assert _search(filled, embedder, query, title=["GARDEN.MD"]) == [TEXTS[3][0]]
    assert _search(filled, embedder, query, file="/c/bread.md", author="linus") == []  # every key must match
    assert set(_search(filled, embedder, query, author=["ada", 2022])) == {TEXTS[0][0], TEXTS[1][0]}  # mixed
    assert _search(filled, embedder, query, nobody="x") == []


def test_bad_filters_are_validation_errors() -> None:
    with pytest.raises(ValidationError, match="empty list"):
        build_filter({"author": []})
    with pytest.raises(ValidationError, match="strings, numbers or booleans"):
        build_filter({"author": {"$ne": "x"}})
    with pytest.raises(ValidationError, match="metadata field"):
        build_filter({"metadata.author": "x"})


def test_files_delete_and_keep_hash(filled: VectorStore, embedder: Embedder) -> None:
    assert filled.files("docs") == {
        "/c/bread.md": "hash-bread",
        "/c/bike.md": "hash-bike",
        "/c/garden.md": "hash-garden",
    }
    # a newer version of bread.md written next to the old one: keep_hash deletes only the old
    newer = Chunk(
        chunk_id("/c/bread.md", 0, "New bread."), "New bread.", "/c/bread.md", "bread.md", "B", 0, {}
    )
    filled.upsert("docs", [newer], embedder.embed([newer.text]), "hash-bread-2")
    assert filled.files("docs")["/c/bread.md"] == ""  # two versions: not "unchanged" for anybody
    assert filled.delete_file("docs", "/c/bread.md", keep_hash="hash-bread-2") == 2
    assert filled.files("docs")["/c/bread.md"] == "hash-bread-2"
    assert filled.delete_file("docs", "/c/bike.md") == 1
    assert filled.delete_file("docs", "/c/bike.md") == 0
    assert filled.count("docs") == 2
    assert "Patch a bicycle inner tube with glue." not in _search(filled, embedder, "bicycle")


def test_a_collection_keeps_one_vector_space(filled: VectorStore, embedder: Embedder) -> None:
    filled.ensure_collection("docs", embedder.dimension, embedding_model=embedder.name)  # same: fine
    with pytest.raises(ValidationError, match="another --collection"):
        filled.ensure_collection("docs", embedder.dimension, embedding_model="someone/else")
    with pytest.raises(ValidationError, match="384 dimensions"):
        filled.ensure_collection("docs", 768, embedding_model=embedder.name)
    filled.ensure_collection("other", embedder.dimension, embedding_model=embedder.name)
    filled.index_fields("other", ["author", "platform"])
    assert filled.collections() == ["docs", "other"]
    assert filled.count("other") == 0


def test_a_missing_collection_is_not_found(store: VectorStore, embedder: Embedder) -> None:
    with pytest.raises(NotFoundError, match="'nope'"):
        store.search("nope", embedder.embed(["x"])[0], 3)
    with pytest.raises(NotFoundError, match="'nope'"):
        store.count("nope")
    with pytest.raises(NotFoundError, match="'nope'"):
        store.files("nope")
    store.health()  # the store itself answers


def test_the_data_survives_reopening(
    filled: VectorStore, rag_settings: RagSettings, embedder: Embedder
) -> None:
    filled.close()
    reopened = VectorStore(rag_settings)
    try:
        assert reopened.count("docs") == 4
        reopened.ensure_collection("docs", embedder.dimension, embedding_model=embedder.name)
        with pytest.raises(ValidationError):  # the model is recorded on disk, not in memory
            reopened.ensure_collection("docs", embedder.dimension, embedding_model="someone/else")
    finally:
        reopened.close()


def test_local_collections_write_without_an_fsync_per_point(
    filled: VectorStore, rag_settings: RagSettings
) -> None:
    database = rag_settings.qdrant_path / "collection" / "docs" / "storage.sqlite"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_from_client(tmp_path: Path, embedder: Embedder) -> None:
    store = VectorStore.from_client(QdrantClient(path=str(tmp_path / "own")))
    try:
        store.ensure_collection("c", embedder.dimension, embedding_model=embedder.name)
        assert store.collections() == ["c"]
    finally:
        store.close()


def test_an_unreachable_server_is_unreachable_error() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = VectorStore(RagSettings(qdrant_url=f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(UnreachableError, match="does not answer"):
            store.health()
        with pytest.raises(UnreachableError):
            store.count("docs")
    finally:
        store.close()


class _Answer(BaseHTTPRequestHandler):
    """A server standing in for Qdrant that answers every request with one status and error."""

    status = 400

    def _answer(self) -> None:
        body = json.dumps({"status": {"error": f"Bad request: Index required ({self.status})"}}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "error"), [(400, ValidationError), (404, NotFoundError), (500, UnreachableError)]
)
def test_server_answers_become_twinserve_errors(status: int, error: type[Exception]) -> None:
    handler = type("Handler", (_Answer,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    store = VectorStore(RagSettings(qdrant_url=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        with pytest.raises(error) as caught:
            store.count("docs")
        if status == 400:
            assert "refused the request" in str(caught.value) and "Index required" in str(caught.value)
        if status == 404:
            assert "no collection 'docs'" in str(caught.value)
    finally:
        store.close()
        server.shutdown()
        server.server_close()


def test_a_folder_held_by_another_process_is_a_clear_busy_error(
    store: VectorStore, rag_settings: RagSettings
) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from twinserve.errors import BusyError
        from twinserve.rag.settings import RagSettings
        from twinserve.rag.store import VectorStore
        try:
            VectorStore(RagSettings(qdrant_path=Path(sys.argv[1]), qdrant_url=None))
        except BusyError as exc:
            print(f"{exc.status_code} {exc.message}")
            sys.exit(3)
        print("opened")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(rag_settings.qdrant_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("409 ")
    assert f"{rag_settings.qdrant_path} is open in another process" in done.stdout
    assert "QDRANT_URL" in done.stdout and "Traceback" not in done.stderr
    assert BusyError.status_code == 409
    store.close()  # released: the other process gets in now
    again = subprocess.run(
        [sys.executable, "-c", script, str(rag_settings.qdrant_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "opened" in again.stdout, again.stderr
