"""Ingest on real parts (Qdrant local mode, the bundled MiniLM): a corpus of every format →
idempotent re-ingest → a changed file replaced → prune; metadata filters; the CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from twinserve.cli import rag_ingest
from twinserve.errors import ValidationError
from twinserve.rag.embed import Embedder
from twinserve.rag.ingest import Ingestor
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import Hit, VectorStore


@pytest.fixture
def settings(rag_settings: RagSettings) -> RagSettings:
    # small chunks, so one file makes several and a change replaces several
    return rag_settings.model_copy(update={"chunk_tokens": 32, "chunk_overlap": 8})


@pytest.fixture
def ingestor(settings: RagSettings, embedder: Embedder, store: VectorStore) -> Ingestor:
    return Ingestor(settings, embedder, store)


def _everything(store: VectorStore, embedder: Embedder, collection: str = "docs") -> list[Hit]:
    return store.search(collection, embedder.embed(["anything"])[0], 10_000)


def _ids_by_source(hits: list[Hit]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for hit in hits:
        found.setdefault(hit.source.split("#")[0], set()).add(hit.id)
    return found


class Recorder:
    """An IngestProgress that remembers what it heard."""

    def __init__(self) -> None:
        self.files = -1
        self.read: list[tuple[str, int, bool]] = []
        self.batches: list[int] = []

    def start(self, files: int) -> None:
        self.files = files

    def file_read(self, source: str, chunks: int, *, unchanged: bool) -> None:
        self.read.append((source, chunks, unchanged))

    def embedded(self, chunks: int, seconds: float) -> None:
        self.batches.append(chunks)


def test_ingest_then_reingest_changes_nothing(
    ingestor: Ingestor, store: VectorStore, embedder: Embedder, corpus: Path
) -> None:
    progress = Recorder()
    report = ingestor.ingest([corpus], progress=progress)
    assert (report.files, report.added, report.unchanged, report.replaced, report.pruned) == (5, 5, 0, 0, 0)
    assert report.chunks == store.count("docs") > 5  # small chunks: some files make several
    assert report.embed_seconds > 0 and report.embeddings_per_s > 0
    assert progress.files == 5 and len(progress.read) == 5
    assert sum(progress.batches) == report.chunks and len(progress.batches) == 1  # one batch across files
    hits = _everything(store, embedder)
    by_source = _ids_by_source(hits)
    assert set(by_source) == {
        "corpus/bread.md", "corpus/bike.txt", "corpus/chess.pdf", "corpus/garden/tomatoes.html", "corpus/posts.jsonl",
    }  # fmt: skip
    bread = sorted((h for h in hits if h.source == "corpus/bread.md"), key=lambda h: h.position)
    assert [h.position for h in bread] == list(range(len(bread))) and len(bread) > 1
    assert {h.title for h in bread} == {"Baking sourdough bread"}
    assert embedder.tokenizer  # chunks obey the ingest's budget in the model's own tokens
    assert max(len(embedder.tokenizer(h.text, add_special_tokens=False)["input_ids"]) for h in hits) <= 32

    again = ingestor.ingest([corpus], progress=Recorder())
    assert (again.files, again.unchanged, again.added, again.replaced, again.chunks) == (5, 5, 0, 0, 0)
    assert store.count("docs") == report.chunks
    assert _ids_by_source(_everything(store, embedder)) == by_source


def test_a_changed_file_replaces_its_chunks(
    ingestor: Ingestor, store: VectorStore, embedder: Embedder, corpus: Path
) -> None:
    ingestor.ingest([corpus])
    before = _ids_by_source(_everything(store, embedder))
    (corpus / "bread.md").write_text("# Rye bread\n\nRye bread is dense and keeps for a week.\n")
    report = ingestor.ingest([corpus])
    assert (report.unchanged, report.replaced, report.added) == (4, 1, 0)
    after = _ids_by_source(_everything(store, embedder))
    assert after["corpus/bread.md"].isdisjoint(before["corpus/bread.md"])  # every old chunk gone
    assert len(after["corpus/bread.md"]) == report.chunks == 1
    assert {k: v for k, v in after.items() if k != "corpus/bread.md"} == {
        k: v for k, v in before.items() if k != "corpus/bread.md"
    }
    [top] = store.search("docs", embedder.embed(["dense rye loaf"])[0], 1)
    assert (top.source, top.title) == ("corpus/bread.md", "Rye bread")

    (corpus / "bread.md").write_text("\n")  # emptied: nothing left to find
    emptied = ingestor.ingest([corpus])
    assert emptied.replaced == 1 and "corpus/bread.md" not in _ids_by_source(_everything(store, embedder))


def test_prune_removes_only_files_gone_from_the_given_paths(
    ingestor: Ingestor, store: VectorStore, embedder: Embedder, corpus: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "note.txt").write_text("A note kept in another folder.")
    ingestor.ingest([corpus, elsewhere])
    (corpus / "bike.txt").unlink()
    (corpus / "garden" / "tomatoes.html").rename(corpus / "tomatoes.html")  # renamed: new file, old one gone

    kept = ingestor.ingest([corpus])  # without --prune the old chunks stay
    assert kept.pruned == 0 and kept.added == 1
    assert "corpus/bike.txt" in _ids_by_source(_everything(store, embedder))

    pruned = ingestor.ingest([corpus], prune=True)
    assert (pruned.pruned, pruned.unchanged, pruned.chunks) == (2, 4, 0)
    sources = set(_ids_by_source(_everything(store, embedder)))
    assert "corpus/bike.txt" not in sources and "corpus/garden/tomatoes.html" not in sources
    assert {"corpus/tomatoes.html", "elsewhere/note.txt"} <= sources  # outside the pruned path: untouched


def test_metadata_is_stored_and_filterable(
    ingestor: Ingestor, store: VectorStore, embedder: Embedder, corpus: Path
) -> None:
    ingestor.ingest([corpus], meta={"platform": "blog", "author": "team"})
    query = embedder.embed(["vectors"])[0]
    everything = _everything(store, embedder)
    assert {h.metadata["platform"] for h in everything} == {"blog"}
    ada = store.search("docs", query, 50, {"author": "ada"})
    assert [(h.source, h.metadata) for h in ada] == [
        ("corpus/posts.jsonl#1", {"platform": "blog", "author": "ada", "year": 2024})
    ]
    either = store.search("docs", query, 50, {"author": ["ada", "linus"], "platform": "blog"})
    assert {h.source for h in either} == {"corpus/posts.jsonl#1", "corpus/posts.jsonl#2"}
    assert {h.source for h in store.search("docs", query, 50, {"year": 2023})} == {"corpus/posts.jsonl#2"}
    assert len(store.search("docs", query, 50, {"author": "team"})) == len(everything) - 2

    # new metadata is a new version of every file: same ids (content hashes), new payload
    ids = {h.id for h in everything}
    again = ingestor.ingest([corpus], meta={"platform": "web"})
    assert (again.replaced, again.unchanged) == (5, 0)
    after = _everything(store, embedder)
    assert {h.id for h in after} == ids and {h.metadata["platform"] for h in after} == {"web"}


def test_collections_are_separate_and_the_default_comes_from_settings(
    ingestor: Ingestor, store: VectorStore, embedder: Embedder, corpus: Path
) -> None:
    report = ingestor.ingest([corpus / "bike.txt"], collection="bikes")
    assert report.collection == "bikes" and store.collections() == ["bikes"]
    [hit] = _everything(store, embedder, "bikes")
    assert hit.source == "bike.txt"  # a file given directly: shown by its name


def test_chunks_never_exceed_what_the_model_reads(
    rag_settings: RagSettings, embedder: Embedder, store: VectorStore, tmp_path: Path
) -> None:
    ingestor = Ingestor(rag_settings.model_copy(update={"chunk_tokens": 1024}), embedder, store)
    assert ingestor.chunk_tokens == embedder.max_tokens - 2 == 254  # [CLS] and [SEP] count too
    long = tmp_path / "long.txt"
    long.write_text(" ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(300)))
    ingestor.ingest([long])
    counts = [len(embedder.tokenizer(h.text)["input_ids"]) for h in _everything(store, embedder)]
    assert max(counts) <= embedder.max_tokens and len(counts) > 5


def test_bad_input_names_the_file_and_writes_nothing_for_it(
    ingestor: Ingestor, store: VectorStore, corpus: Path
) -> None:
    (corpus / "zz-bad.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(ValidationError, match=r"zz-bad\.jsonl:2"):
        ingestor.ingest([corpus])
    assert all("zz-bad" not in file for file in store.files("docs"))
    with pytest.raises(ValidationError, match="reserved"):
        ingestor.ingest([corpus], meta={"source": "x"})


def test_embed_vectors_are_normalized_float32(embedder: Embedder) -> None:
    vectors = embedder.embed(["one", "two three"])
    assert vectors.shape == (2, embedder.dimension) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, embedder.dimension)


# --- the CLI -------------------------------------------------------------------------------------

runner = CliRunner()
cli = typer.Typer()
cli.command("ingest")(rag_ingest.ingest_command)


@cli.callback()
def _group() -> None:
    """A group, so the command is invoked by name as under `twinserve rag`."""


@pytest.fixture
def cli_env(rag_settings: RagSettings, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TWINSERVE_RAG_QDRANT_PATH", str(rag_settings.qdrant_path))
    monkeypatch.delenv("QDRANT_URL", raising=False)
    monkeypatch.setattr(rag_ingest.out, "width", 250)
    return rag_settings.qdrant_path


def test_cli_json_report_then_summary(cli_env: Path, corpus: Path, embedder: Embedder) -> None:
    first = runner.invoke(
        cli,
        ["ingest", str(corpus), "--chunk-tokens", "64", "--overlap", "8", "--meta", "edition=2020", "--json"],
    )
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert (report["files"], report["added"], report["collection"]) == (5, 5, "docs")
    assert report["chunks"] >= 5 and report["embeddings_per_s"] > 0

    second = runner.invoke(
        cli, ["ingest", str(corpus), "--chunk-tokens", "64", "--overlap", "8", "--meta", "edition=2020"]
    )
    assert second.exit_code == 0, second.output
    assert "5 files — 0 added, 0 replaced, 5 unchanged, 0 pruned; 0 chunks embedded" in second.stdout

    store = VectorStore(RagSettings(qdrant_path=cli_env, qdrant_url=None))
    try:
        hits = store.search(
            "docs", embedder.embed(["x"])[0], 100, {"edition": 2020}
        )  # --meta edition=2020 is a number
        assert len(hits) == store.count("docs") == report["chunks"]
    finally:
        store.close()


def test_cli_errors(cli_env: Path, corpus: Path, tmp_path: Path) -> None:
    missing = runner.invoke(cli, ["ingest", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
    bad_meta = runner.invoke(cli, ["ingest", str(corpus), "--meta", "novalue"])
    assert bad_meta.exit_code == 2 and "--meta takes KEY=VALUE" in bad_meta.output
    bad_overlap = runner.invoke(cli, ["ingest", str(corpus), "--chunk-tokens", "32", "--overlap", "40"])
    assert bad_overlap.exit_code == 2 and "must be smaller than chunk_tokens" in bad_overlap.output

    holder = VectorStore(RagSettings(qdrant_path=cli_env, qdrant_url=None))
    try:  # (in this process a second open fails the same way as from another process)
        busy = runner.invoke(cli, ["ingest", str(corpus)])
    finally:
        holder.close()
    assert busy.exit_code == 1 and "is open in another process" in busy.output
    assert "Traceback" not in busy.output


def test_parse_meta() -> None:
    assert rag_ingest.parse_meta(["a=1", "b=true", "c=1.5", "d=text", "e=[1]", "f=", "g=x=y"]) == {
        "a": 1, "b": True, "c": 1.5, "d": "text", "e": "[1]", "f": "", "g": "x=y",
    }  # fmt: skip
