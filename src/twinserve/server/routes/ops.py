"""Operational routes, always open: `/health`, `/ping`, `/info`, `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse

from twinserve.server.protocol import tgi
from twinserve.server.routes import service_of

router = APIRouter(tags=["ops"])


def _health(request: Request) -> Response:
    ok, state, reason = service_of(request).health()
    body: dict[str, str] = {"status": state}
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/health")
async def health(request: Request) -> Response:
    """200 once the model is loaded and warmed; 503 while loading, draining or after a failure."""
    return _health(request)


@router.get("/")
async def root_health(request: Request) -> Response:
    """TGI answers `GET /` like its health route (`POST /` generates)."""
    return _health(request)


@router.get("/ping")
async def ping(request: Request) -> Response:
    """SageMaker's health check (same answer as `/health`)."""
    return _health(request)


@router.get("/info", response_model=tgi.Info)
async def info(request: Request) -> tgi.Info:
    """What is served: model id and revision, weights hash, dtype, limits, version."""
    return service_of(request).info()


class MetricsResponse(Response):
    media_type = "text/plain"


@router.get("/metrics", response_class=MetricsResponse)
async def metrics(request: Request) -> Response:
    """Prometheus text format, TGI's metric names."""
    registry = service_of(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
