"""The app factory: one FastAPI app serving TGI, OpenAI and SageMaker routes over one engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from twinserve import __version__
from twinserve.config import ServeConfig
from twinserve.errors import (
    ClientError,
    NotFoundError,
    TwinserveError,
    ValidationError,
)
from twinserve.server.errors import Wire, describe_validation_errors, error_response
from twinserve.server.middleware import PayloadLimitMiddleware, RequestContextMiddleware
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
    )
    app.state.service = service
    app.state.api_key = config.api_key.get_secret_value() if config.api_key else None
    app.state.log_prompts = config.log_prompts
    _install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(tgi.router)
    app.include_router(openai.router)
    app.include_router(sagemaker.router)
    app.add_middleware(PayloadLimitMiddleware, limit=config.payload_limit)
    app.add_middleware(RequestContextMiddleware)  # added last: outermost, so every answer has an id
    return app


def _wire(request: Request) -> Wire:
    wire = getattr(request.state, "wire", None)
    if wire in ("tgi", "openai"):
        return wire
    return "openai" if request.url.path.startswith("/v1/") else "tgi"


GENERATION_ROUTES = frozenset(
    {"/generate", "/generate_stream", "/", "/v1/chat/completions", "/v1/completions", "/invocations"}
)


def _count_refusal(request: Request, error: TwinserveError) -> None:
    """A generation request refused before reaching the engine still counts, as TGI counts it."""
    if request.method != "POST" or request.url.path not in GENERATION_ROUTES:
        return
    if getattr(request.state, "metrics_counted", False):
        return
    metrics = request.app.state.service.metrics
    metrics.request_received()
    metrics.request_failed(error.error_type)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TwinserveError)
    async def _twinserve_error(request: Request, exc: TwinserveError) -> Response:
        _count_refusal(request, exc)
        return error_response(exc, _wire(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = ValidationError(describe_validation_errors(exc.errors()))
        _count_refusal(request, error)
        return error_response(error, _wire(request))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        error: TwinserveError
        if isinstance(exc.__cause__, TwinserveError):  # e.g. the payload limit hit while parsing the body
            error = exc.__cause__
        elif exc.status_code == 404:
            error = NotFoundError(f"no route {request.method} {request.url.path}")
        else:
            error = ClientError(str(exc.detail))
            error.status_code = exc.status_code
        return error_response(error, _wire(request), headers=dict(exc.headers or {}))
