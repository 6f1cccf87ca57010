"""`twinserve rag`: ingest documents, serve the RAG business service, search and ask it.

`rag serve` reaches the LLM through `LLMClient` only: over HTTP (`--llm URL`, `--endpoint
NAME`), or in this very process (`--model REF`, the monolith: the LLM app runs in the same
process and the client reaches it without a network hop).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer

from twinserve.cli.output import err, fail, out

app = typer.Typer(help="The RAG business service: ingest, serve, search, ask, eval.", no_args_is_help=True)

DEFAULT_PORT = 8800
IN_PROCESS_URL = "http://llm.in-process"


def _settings(collection: str | None) -> Any:
    from pydantic import ValidationError as PydanticValidationError

    from twinserve.rag.settings import RagSettings

    try:
        settings = RagSettings()
        return settings.model_copy(update={"collection": collection}) if collection else settings
    except PydanticValidationError as exc:
        fail(f"invalid RAG settings: {exc}", 2)


def _parse_filters(pairs: list[str]) -> dict[str, Any] | None:
    filters: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--filter takes key=value, not {pair!r}", 2)
        previous = filters.get(key)
        if previous is None:
            filters[key] = value
        else:  # the same key twice: any of the values
            filters[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
    return filters or None


def _llm_client(
    llm: str | None, endpoint: str | None, model: str | None, llm_api_key: str | None, timeout: float = 300.0
) -> Any:
    """The one LLMClient of the process, and the ASGI apps it needs hosted (monolith)."""
    from twinserve.client import HttpTransport, LLMClient
    from twinserve.errors import TwinserveError

    given = [name for name, value in (("--llm", llm), ("--endpoint", endpoint), ("--model", model)) if value]
    if len(given) != 1:
        fail("give exactly one of --llm URL, --endpoint NAME and --model REF", 2)
    if llm:
        return LLMClient(llm, api_key=llm_api_key, timeout=timeout), []
    if endpoint:
        from twinserve.platforms import platform_of

        try:
            platform = platform_of(endpoint)
            ep = platform.describe(endpoint)
            transport = platform.transport(ep)
        except TwinserveError as exc:
            fail(exc.message)
        if not isinstance(transport, HttpTransport):
            # the prompt is fitted with the LLM's /info and /tokenize, which SageMaker's runtime lacks
            fail(
                f"endpoint {endpoint!r} is reached through {type(transport).__name__}, which has no "
                "/info or /tokenize: give the RAG service an HTTP LLM with --llm URL"
            )
        return LLMClient(transport=transport), []
    from twinserve.config import ServeConfig
    from twinserve.server.app import create_app

    llm_app = create_app(ServeConfig(model=model))
    return LLMClient(transport=HttpTransport(IN_PROCESS_URL, app=llm_app, timeout=timeout)), [llm_app]


@app.command("serve")
def serve_command(
    llm: str | None = typer.Option(None, "--llm", help="The LLM microservice's URL (twinserve serve / TGI)."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="A twinserve endpoint by name."),
    model: str | None = typer.Option(
        None, "--model", help="Run the model in this process (monolith): `default`, models:/name@alias, …"
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(DEFAULT_PORT, "--port"),
    collection: str | None = typer.Option(None, "--collection", help="Default: docs."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Require it on /rag and /search. Env: TWINSERVE_RAG_API_KEY."
    ),
    llm_api_key: str | None = typer.Option(
        None, "--llm-api-key", help="The LLM's key (with --llm). Env: TWINSERVE_RAG_LLM_API_KEY."
    ),
    log_format: str = typer.Option("json", "--log-format", help="json | text"),
    log_queries: bool = typer.Option(False, "--log-queries", help="Log query text (off: never logged)."),
) -> None:
    """Serve `/rag`, `/search`, `/health`, `/metrics` in front of an LLM."""
    from twinserve.errors import TwinserveError
    from twinserve.rag.app import create_rag_app
    from twinserve.rag.run import run_rag

    settings = _settings(collection)
    try:
        settings.embedding_model_path()
    except TwinserveError as exc:
        fail(exc.message)
    api_key = api_key or os.environ.get("TWINSERVE_RAG_API_KEY") or None
    llm_api_key = llm_api_key or os.environ.get("TWINSERVE_RAG_LLM_API_KEY") or None
    client, hosted = _llm_client(llm, endpoint, model, llm_api_key, settings.llm_timeout_s)
    rag_app = create_rag_app(settings, client, api_key=api_key, hosted=hosted, log_queries=log_queries)
    run_rag(rag_app, host=host, port=port, log_format=log_format)


@app.command("search")
def search_command(
    query: str = typer.Argument(..., help="What to look for."),
    k: int = typer.Option(4, "--k", min=1, max=50),
    filters: list[str] = typer.Option([], "--filter", help="key=value metadata to match (repeatable)."),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="Plain top-k, no MMR/cross-encoder."),
    collection: str | None = typer.Option(None, "--collection"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Retrieval only, in this process (no LLM, no service): the chunks `/rag` would draw on."""
    import asyncio

    from twinserve.errors import TwinserveError
    from twinserve.rag.embed import load_embedder
    from twinserve.rag.retrieve import Retriever
    from twinserve.rag.schemas import Timings
    from twinserve.rag.store import VectorStore

    settings = _settings(collection)
    try:
        embedder = load_embedder(settings.embedding_model_path(), settings.embed_batch_size)
        store = VectorStore(settings)
        try:
            retriever = Retriever(embedder, store, settings.collection)
            timings = Timings()
            found = asyncio.run(
                retriever.retrieve(query, k, timings, filters=_parse_filters(filters), rerank=not no_rerank)
            )
        finally:
            store.close()
    except TwinserveError as exc:
        fail(exc.message)
    if as_json:
        typer.echo(json.dumps([_hit_json(h) for h in found.hits], indent=2))
        return
    for rank, hit in enumerate(found.hits, 1):
        out.print(
            f"[bold]{rank}.[/bold] {hit.score:.3f}  {hit.source}  [dim]{hit.title}[/dim]", highlight=False
        )
        out.print(f"   {_preview(hit.text)}", highlight=False, soft_wrap=True)
    err.print(f"[dim]{timings.retrieval_ms:.0f} ms[/dim]")


def _hit_json(hit: Any) -> dict[str, Any]:
    return {"id": hit.id, "score": hit.score, "source": hit.source, "title": hit.title, "text": hit.text}


def _preview(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@app.command("ask")
def ask_command(
    question: str = typer.Argument(...),
    url: str = typer.Option(f"http://127.0.0.1:{DEFAULT_PORT}", "--url", help="The RAG service."),
    k: int = typer.Option(4, "--k", min=1, max=50),
    filters: list[str] = typer.Option([], "--filter", help="key=value metadata to match (repeatable)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they come."),
    api_key: str | None = typer.Option(None, "--api-key", help="Env: TWINSERVE_RAG_API_KEY."),
    as_json: bool = typer.Option(False, "--json", help="The whole /rag answer as JSON."),
) -> None:
    """Ask a running RAG service; prints the answer, then its sources."""
    from twinserve.errors import TwinserveError
    from twinserve.rag.ask import ask

    body = {"query": question, "k": k, "filters": _parse_filters(filters), "max_new_tokens": max_new_tokens}
    key = api_key or os.environ.get("TWINSERVE_RAG_API_KEY") or None
    try:
        answer = ask(url, body, api_key=key, on_token=_write if stream and not as_json else None)
    except TwinserveError as exc:
        fail(exc.message)
    if as_json:
        typer.echo(json.dumps(answer, indent=2, ensure_ascii=False))
        return
    if not stream:
        out.print(answer["answer"].strip(), highlight=False, soft_wrap=True)
    else:
        sys.stdout.write("\n")
    print_sources(answer["sources"])


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def print_sources(sources: list[dict[str, Any]]) -> None:
    out.print("[bold]sources[/bold]")
    for n, source in enumerate(sources, 1):
        out.print(f"  [{n}] {source['source']}  ({source['score']:.3f})  {source['title']}", highlight=False)


def _register_commands() -> None:
    from twinserve.cli.rag_ingest import ingest_command

    app.command("ingest")(ingest_command)

    from twinserve.cli.rag_eval import eval_command

    app.command("eval")(eval_command)


_register_commands()
