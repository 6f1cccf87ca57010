"""`twinserve rag ingest PATH…`: files into a Qdrant collection, with a progress bar and a summary.

Thin: flags become RagSettings (the environment fills the rest: TWINSERVE_RAG_QDRANT_PATH,
QDRANT_URL, TWINSERVE_RAG_EMBEDDING_MODEL), the Ingestor does the work. Exit codes: 0 done,
1 the store failed or is busy, 2 bad flags or input (a file that cannot be read names itself).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from twinserve.cli.output import err, fail, out

if TYPE_CHECKING:
    from twinserve.rag.ingest import IngestReport
    from twinserve.rag.settings import RagSettings


def parse_meta(items: list[str]) -> dict[str, Any]:
    """`--meta KEY=VALUE`: numbers and true/false become JSON scalars, anything else stays a string."""
    meta: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--meta takes KEY=VALUE (got {item!r})", 2)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        meta[key.strip()] = parsed if isinstance(parsed, bool | int | float) else value
    return meta


class _Bar:
    """The Ingestor's progress on two rich bars: files read, and chunks embedded (with the rate)."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress
        self._files = progress.add_task("files", total=None, unit="files", detail="")
        self._chunks = progress.add_task("chunks", total=0, unit="embedded", detail="")
        self._made, self._embedded, self._seconds = 0, 0, 0.0

    def start(self, files: int) -> None:
        self._progress.update(self._files, total=files)

    def file_read(self, source: str, chunks: int, *, unchanged: bool) -> None:
        self._made += chunks
        detail = f"{source[-40:]}{' (unchanged)' if unchanged else ''}"
        self._progress.update(self._files, advance=1, detail=detail)
        self._progress.update(self._chunks, total=self._made)

    def embedded(self, chunks: int, seconds: float) -> None:
        self._embedded += chunks
        self._seconds += seconds
        rate = self._embedded / self._seconds if self._seconds else 0.0
        self._progress.update(self._chunks, advance=chunks, detail=f"{rate:.1f} embeddings/s")


def ingest_command(
    paths: list[Path] = typer.Argument(..., help="Files or folders (.md .txt .html .pdf .jsonl)."),
    collection: str | None = typer.Option(None, "--collection", help="Collection (default: docs)."),
    chunk_tokens: int | None = typer.Option(
        None, "--chunk-tokens", help="Tokens per chunk (default 256; at most what the model reads)."
    ),
    overlap: int | None = typer.Option(None, "--overlap", help="Tokens shared by neighbours (default 32)."),
    meta: list[str] = typer.Option([], "--meta", help="KEY=VALUE stored with every chunk (repeatable)."),
    prune: bool = typer.Option(False, "--prune", help="Delete chunks of files under PATH that are gone."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Ingest documents: chunk by the embedding model's tokens, embed, write to Qdrant (idempotent)."""
    from pydantic import ValidationError as SettingsError

    from twinserve.errors import TwinserveError
    from twinserve.rag.settings import RagSettings

    overrides: dict[str, Any] = {
        "collection": collection,
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": overlap,
    }
    try:
        settings = RagSettings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        fail("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()), 2)
    user_meta = parse_meta(meta)
    try:
        from twinserve.rag.documents import check_metadata, discover

        check_metadata(user_meta, "--meta")
        discover(paths)  # a wrong path fails now, not after seconds of loading the model
        report = _run(settings, paths, user_meta, prune=prune, show_progress=not as_json)
    except TwinserveError as exc:
        fail(exc.message, 2 if exc.status_code in (404, 422) else 1)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    out.print(
        f"[bold]{report.collection}[/bold] ({settings.store_label()}): {report.files} files — "
        f"{report.added} added, {report.replaced} replaced, {report.unchanged} unchanged, "
        f"{report.pruned} pruned; {report.chunks} chunks embedded in {report.embed_seconds:.1f}s "
        f"({report.embeddings_per_s:.1f} embeddings/s), {report.seconds:.1f}s in all",
        highlight=False,
        soft_wrap=True,
    )


def _run(
    settings: RagSettings, paths: list[Path], meta: dict[str, Any], *, prune: bool, show_progress: bool
) -> IngestReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from twinserve.rag.embed import load_embedder
    from twinserve.rag.ingest import Ingestor
    from twinserve.rag.store import VectorStore

    store = VectorStore(settings)  # first: a folder held by `rag serve` fails before the model loads
    try:
        began = time.perf_counter()
        with (
            err.status("loading the embedding model", spinner="dots")
            if show_progress
            else contextlib.nullcontext()
        ):
            embedder = load_embedder(settings.embedding_model_path(), settings.embed_batch_size)
        if show_progress:
            seconds = time.perf_counter() - began
            err.print(f"[dim]{embedder.name} loaded in {seconds:.1f}s[/dim]", highlight=False)
        ingestor = Ingestor(settings, embedder, store)
        if not show_progress:
            return ingestor.ingest(paths, collection=settings.collection, meta=meta, prune=prune)
        columns = (
            TextColumn("{task.description:<6}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]:<8}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
        )
        with Progress(*columns, console=err, transient=True) as progress:
            return ingestor.ingest(
                paths, collection=settings.collection, meta=meta, prune=prune, progress=_Bar(progress)
            )
    finally:
        store.close()
