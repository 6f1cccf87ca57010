"""The RAG service's FastAPI app: `/rag`, `/search`, `/health`, `/metrics`, `/info`.

Async end to end: embeddings and vector searches run on worker threads, the LLM is awaited
through the one `LLMClient` of the process. Errors answer `{"error", "error_type",
"request_id"}` (+ `llm` on 424) with their status — 422 bad body, 424 the LLM failed, 503 the
vector store is down — and never a traceback. `/rag` and `/search` need the API key when one
is set; `/health`, `/metrics` and `/info` stay open for probes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp

from twinserve import __version__
from twinserve.api_keys import require_key
from twinserve.client import LLMClient
from twinserve.errors import LLMFailedError, NotFoundError, TwinserveError, ValidationError
from twinserve.rag.embed import Embedder, load_embedder
from twinserve.rag.metrics import RagMetrics
from twinserve.rag.middleware import RequestContextMiddleware
from twinserve.rag.rerank import load_cross_encoder
from twinserve.rag.retrieve import Retriever
from twinserve.rag.schemas import ErrorBody, RagRequest, RagResponse, SearchRequest, SearchResponse
from twinserve.rag.service import RagService
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import VectorStore

log = logging.getLogger("twinserve.rag")

PAYLOAD_LIMIT = 256 * 1024  # a question and its options; documents come in by `rag ingest`
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 413, 422, 424, 503)}


def create_rag_app(
    settings: RagSettings,
    llm: LLMClient,
    *,
    api_key: str | None = None,
    embedder: Embedder | None = None,
    store: VectorStore | None = None,
    hosted: Sequence[ASGIApp] = (),
    log_queries: bool = False,
    payload_limit: int = PAYLOAD_LIMIT,
) -> FastAPI:
    """The app over one LLM client. `hosted`: ASGI apps this process also runs (the monolith's
    in-process LLM app), whose lifespans start before and stop after the service's own."""
    metrics = RagMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            # the embedder first: the hosted LLM app loads its engine on a thread of its own, and
            # two threads importing transformers at once can fail (its lazy module is not thread-safe)
            model = embedder
            if model is None:
                model = await asyncio.to_thread(
                    load_embedder, settings.embedding_model_path(), settings.embed_batch_size
                )
            vectors = store
            if vectors is None:
                vectors = await asyncio.to_thread(VectorStore, settings)
                stack.callback(vectors.close)
            reranker = (
                await asyncio.to_thread(load_cross_encoder, settings.cross_encoder)
                if settings.cross_encoder
                else None
            )
            for hosted_app in hosted:
                await stack.enter_async_context(hosted_app.router.lifespan_context(hosted_app))  # type: ignore[attr-defined]
            stack.push_async_callback(llm.aclose)
            retriever = Retriever(model, vectors, settings.collection, reranker=reranker)
            app.state.service = RagService(retriever, llm, metrics)
            log.info(
                "rag service ready",
                extra={"collection": settings.collection, "store": settings.store_label(), "llm": repr(llm)},
            )
            yield

    app = FastAPI(
        title="twinserve RAG",
        version=__version__,
        summary="Retrieval-augmented answers with sources, over an LLM endpoint.",
        lifespan=lifespan,
    )
    app.state.api_key = api_key
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.log_queries = log_queries
    _install_error_handlers(app)
    _install_routes(app)
    app.add_middleware(RequestContextMiddleware, payload_limit=payload_limit)
    return app


def _service(request: Request) -> RagService:
    service: RagService = request.app.state.service
    return service


async def _check_key(request: Request) -> None:
    require_key(request.headers, request.app.state.api_key)


def _rid(request: Request) -> str | None:
    rid: str | None = request.scope.get("state", {}).get("request_id")
    return rid


def _error(error: TwinserveError, request_id: str | None) -> JSONResponse:
    body = ErrorBody(
        error=error.message,
        error_type=error.error_type,
        request_id=request_id,
        llm=error.upstream if isinstance(error, LLMFailedError) else None,
    )
    headers = {"www-authenticate": "Bearer"} if error.status_code == 401 else None
    return JSONResponse(body.model_dump(exclude_none=True), status_code=error.status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TwinserveError)
    async def _twinserve_error(request: Request, exc: TwinserveError) -> Response:
        return _error(exc, _rid(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        return _error(ValidationError(f"invalid request: {problems}"), _rid(request))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        error: TwinserveError
        if exc.status_code == 404:
            error = NotFoundError(f"no route {request.method} {request.url.path}")
        else:
            error = TwinserveError(str(exc.detail))
            error.status_code = exc.status_code
            error.error_type = "client"
        return _error(error, _rid(request))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"request_id": _rid(request)})
        return _error(TwinserveError("internal error"), _rid(request))


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _record(request: Request, route: str, status: int, started: float) -> None:
    metrics: RagMetrics = request.app.state.metrics
    metrics.requests.labels(route, str(status)).inc()
    metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def _install_routes(app: FastAPI) -> None:
    keyed = [Depends(_check_key)]

    @app.post("/rag", response_model=RagResponse, responses=_ERRORS, dependencies=keyed)
    async def rag(body: RagRequest, request: Request) -> Response:
        """Answer `query` from the collection, with the sources the answer was given.
        `stream: true` answers server-sent events: `sources`, `token`…, then `done` (or `error`)."""
        started = time.perf_counter()
        service = _service(request)
        rid = _rid(request)
        _log_query(request, body.query)
        try:
            if not body.stream:
                answer = await service.answer(body, rid)
                _record(request, "/rag", 200, started)
                return JSONResponse(answer.model_dump(exclude_none=True))
            stream = await service.open_stream(body, rid)
        except TwinserveError as exc:
            _record(request, "/rag", exc.status_code, started)
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                async for event, data in stream.events():
                    yield _sse(event, data)
            finally:
                await stream.aclose()
                _record(request, "/rag", 200, started)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @app.post("/search", response_model=SearchResponse, responses=_ERRORS, dependencies=keyed)
    async def search(body: SearchRequest, request: Request) -> SearchResponse:
        """Retrieval only: the chunks `/rag` would draw on, best first."""
        started = time.perf_counter()
        _log_query(request, body.query)
        try:
            found = await _service(request).search(body)
        except TwinserveError as exc:
            _record(request, "/search", exc.status_code, started)
            raise
        _record(request, "/search", 200, started)
        return found

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 when the vector store and the LLM both answer; 503 naming what is down."""
        checks = await _service(request).health()
        down = [name for name, check in checks.items() if not check["ok"]]
        body: dict[str, Any] = {"status": "ok" if not down else "unavailable", **checks}
        if down:
            body["down"] = down
        return JSONResponse(body, status_code=503 if down else 200)

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        """What this service retrieves from and answers with (never a key)."""
        service = _service(request)
        settings: RagSettings = request.app.state.settings
        return {
            "version": __version__,
            "collection": settings.collection,
            "vector_store": settings.store_label(),
            "embedding_model": service.retriever.embedder.name,
            "reranker": service.retriever.reranker.name if service.retriever.reranker else "mmr",
            "llm": repr(service.llm),
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        registry = request.app.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _log_query(request: Request, query: str) -> None:
    """The query text is logged only when the operator asked for it (`--log-queries`)."""
    if request.app.state.log_queries:
        log.info("query", extra={"request_id": _rid(request), "query": query})
