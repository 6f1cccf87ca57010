"""The app factory: one FastAPI app serving TGI, OpenAI and SageMaker routes over one engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Scope

from twinserve import __version__
from twinserve.config import ServeConfig
from twinserve.errors import ClientError, NotFoundError, TwinserveError
from twinserve.server.auth import check_api_key
from twinserve.server.errors import error_response
from twinserve.server.middleware import (
    CatchAllMiddleware,
    PayloadLimitMiddleware,
    RequestContextMiddleware,
    wire_of,
)
from twinserve.server.openapi import openapi_document
from twinserve.server.protocol.validation import validation_error
from twinserve.server.routes import openai, ops, sagemaker, tgi
from twinserve.server.service import ModelService


def create_app(config: ServeConfig, service: ModelService | None = None) -> FastAPI:
    """Build the app. Without a `service`, the model loads in the background at startup."""
    service = service or ModelService(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_loading()
        try:
            yield
        finally:
            service.shutdown()

    app = FastAPI(
        title="twinserve",
        version=__version__,
        summary="LLM microservice: TGI, OpenAI and SageMaker routes over twinserve's engine.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.state.api_key = config.api_key.get_secret_value() if config.api_key else None
    app.state.log_prompts = config.log_prompts
    app.state.sse_keepalive_s = config.sse_keepalive_s
    _install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(tgi.router)
    app.include_router(openai.router)
    app.include_router(sagemaker.router)
    _install_docs(app, service, protected=app.state.api_key is not None and not config.public_docs)
    app.add_middleware(PayloadLimitMiddleware, limit=config.payload_limit)
    app.add_middleware(CatchAllMiddleware, on_error=_count_internal_error)
    app.add_middleware(RequestContextMiddleware)  # added last: outermost, so every answer has an id
    return app


GENERATION_ROUTES = frozenset(
    {"/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions", "/invocations"}
)


def _count_refusal(scope: Scope, service: ModelService, error: TwinserveError) -> None:
    """A generation request refused before reaching the engine still counts, as TGI counts it."""
    if scope.get("method") != "POST" or scope.get("path") not in GENERATION_ROUTES:
        return
    state = scope.setdefault("state", {})
    if state.get("metrics_counted", False):
        return
    state["metrics_counted"] = True
    service.metrics.request_received()
    service.metrics.request_failed(error.error_type)


def _count_internal_error(scope: Scope, error: TwinserveError) -> None:
    """A bug fails the request whatever the engine made of it: counted as a failure once."""
    service: ModelService = scope["app"].state.service
    if scope.get("state", {}).get("metrics_counted", False):  # already counted as received
        service.metrics.request_failed(error.error_type)
    else:
        _count_refusal(scope, service, error)


def _install_error_handlers(app: FastAPI) -> None:
    def answer(request: Request, error: TwinserveError, headers: dict[str, str] | None = None) -> Response:
        _count_refusal(request.scope, request.app.state.service, error)
        return error_response(error, wire_of(request.scope), headers=headers)

    @app.exception_handler(TwinserveError)
    async def _twinserve_error(request: Request, exc: TwinserveError) -> Response:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return answer(request, validation_error(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        error: TwinserveError
        if isinstance(exc.__cause__, TwinserveError):  # e.g. a body the strict JSON decoder refused
            error = exc.__cause__
        elif exc.status_code == 404:
            error = NotFoundError(f"no route {request.method} {request.url.path}")
        else:
            error = ClientError(str(exc.detail))
            error.status_code = exc.status_code
        return answer(request, error, headers=dict(exc.headers or {}))


def _install_docs(app: FastAPI, service: ModelService, *, protected: bool) -> None:
    """`/openapi.json` (with this server's limits), `/docs` and `/redoc`, behind the API key
    when one is set (unless public)."""
    dependencies: list[Any] = [Depends(check_api_key)] if protected else []
    title = f"{app.title} {app.version}"
    app.openapi = lambda: openapi_document(app, service)  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=title)

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=title)
