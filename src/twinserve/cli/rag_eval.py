"""`twinserve rag eval QUESTIONS.jsonl`: hit@k and MRR of retrieval, and (--answers) answer latency.

Runs in this process against the collection, like `rag search`: no RAG service is needed;
`--answers` also reaches an LLM (`--llm URL` or `--endpoint NAME`) through the same
`RagService` the service runs. Exit 2 on a bad question set, 1 when retrieval or the LLM fails.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from twinserve.cli.output import err, fail, out

if TYPE_CHECKING:  # the embedder pulls in torch: imported when the command runs
    from twinserve.rag.eval import EvalQuestion, EvalReport, QuestionResult


def eval_command(
    questions: Path = typer.Argument(
        ..., help='JSONL: {"query": …, "expected_source": …} per line (optional "filters").'
    ),
    k: int = typer.Option(4, "--k", min=1, max=50, help="Chunks retrieved per question."),
    collection: str | None = typer.Option(None, "--collection", help="Default: docs."),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="Plain top-k, no MMR/cross-encoder."),
    answers: bool = typer.Option(
        False, "--answers", help="Also answer each question; needs --llm/--endpoint."
    ),
    llm: str | None = typer.Option(None, "--llm", help="With --answers: the LLM microservice's URL."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="With --answers: a twinserve endpoint."),
    llm_api_key: str | None = typer.Option(
        None, "--llm-api-key", envvar="TWINSERVE_RAG_LLM_API_KEY", show_default=False, help="The LLM's key."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, max=8192, help="With --answers."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for CI)."),
) -> None:
    """Score retrieval on questions with known sources: hit@k, MRR, per-question rank, latency."""
    from twinserve.errors import TwinserveError
    from twinserve.rag.eval import load_questions

    if (llm or endpoint) and not answers:
        fail("--llm and --endpoint go with --answers", 2)
    if answers and not (llm or endpoint):
        fail("--answers needs --llm URL or --endpoint NAME", 2)
    try:
        loaded = load_questions(questions)
    except TwinserveError as exc:
        fail(exc.message, 2)
    try:
        report = asyncio.run(
            _run(loaded, k, collection, not no_rerank, answers, llm, endpoint, llm_api_key, max_new_tokens)
        )
    except TwinserveError as exc:
        fail(exc.message)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    print_report(report)


async def _run(
    questions: list[tuple[int, EvalQuestion]],
    k: int,
    collection: str | None,
    rerank: bool,
    answers: bool,
    llm: str | None,
    endpoint: str | None,
    llm_api_key: str | None,
    max_new_tokens: int,
) -> EvalReport:
    """Build what `rag/app.py`'s lifespan builds (embedder, store, reranker, retriever, service),
    run the questions, close it all."""
    from twinserve.cli.rag import _llm_client, _settings
    from twinserve.rag.embed import load_embedder
    from twinserve.rag.eval import run_eval
    from twinserve.rag.rerank import load_cross_encoder
    from twinserve.rag.retrieve import Retriever
    from twinserve.rag.service import RagService
    from twinserve.rag.store import VectorStore

    settings = _settings(collection)
    embedder = await asyncio.to_thread(
        load_embedder, settings.embedding_model_path(), settings.embed_batch_size
    )
    reranker = (
        await asyncio.to_thread(load_cross_encoder, settings.cross_encoder)
        if settings.cross_encoder
        else None
    )
    client = _llm_client(llm, endpoint, None, llm_api_key)[0] if answers else None
    store = await asyncio.to_thread(VectorStore, settings)
    try:
        retriever = Retriever(embedder, store, settings.collection, reranker=reranker)
        service = RagService(retriever, client) if client is not None else None
        progress = err.status(f"evaluating {len(questions)} questions …") if err.is_terminal else None
        done = 0

        def advance(_: QuestionResult) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress.update(f"evaluating: {done}/{len(questions)} …")

        if progress is not None:
            progress.start()
        try:
            return await run_eval(
                questions,
                retriever,
                k=k,
                rerank=rerank,
                service=service,
                max_new_tokens=max_new_tokens,
                on_result=advance,
            )
        finally:
            if progress is not None:
                progress.stop()
    finally:
        store.close()
        if client is not None:
            await client.aclose()


def print_report(report: EvalReport) -> None:
    answer_ms = report.answer_ms
    answers = answer_ms is not None
    table = Table(
        title=f"rag eval: {report.collection}, k={report.k}, rerank {'on' if report.rerank else 'off'}"
    )
    for column in ("line", "query", "expected", "rank", "retrieval ms", *(["answer ms"] if answers else [])):
        table.add_column(column, justify="right" if column in ("line", "rank") or "ms" in column else "left")
    for r in report.results:
        rank = str(r.rank) if r.rank is not None else "[red]miss[/red]"
        row = [str(r.line), _short(r.query), r.expected_source, rank, f"{r.retrieval_ms:.1f}"]
        if answers:
            row.append("" if r.answer_ms is None else f"{r.answer_ms:.0f}")
        table.add_row(*row)
    out.print(table)
    out.print(
        f"hit@{report.k}: {report.hit_at_k:.3f} ({report.hits}/{report.questions})   MRR: {report.mrr:.3f}",
        highlight=False,
    )
    lat = report.retrieval_ms
    out.print(f"retrieval ms: p50 {lat.p50:.1f}  p95 {lat.p95:.1f}", highlight=False)
    if answer_ms is not None:
        model = f" ({report.model.name} {report.model.version or ''}".rstrip() + ")" if report.model else ""
        out.print(f"answer ms: p50 {answer_ms.p50:.0f}  p95 {answer_ms.p95:.0f}{model}", highlight=False)


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
