"""The HTTP front of an async endpoint's job service: submit, poll, fetch the answer, and the
service's own health, stats and metrics (`create_async_app`).

```
POST /async-invocations              202 {inference_id, status, output_location, failure_location}
GET  /async-invocations/{id}         200 the job (status, attempts, times, reason, locations)
GET  /async-invocations/{id}/output  200 the answer (X-Job-Status: succeeded|failed|expired); 409 while queued/running
GET  /async/health                   200 while the queue answers
GET  /async/stats                    {backlog, counts, replicas, capacity, in_flight} (the controller's input)
GET  /async/metrics                  Prometheus text (own registry)
```
A submit is answered only after `JobQueue.submit` returned, so a 202 means the job is durable.
What a replica would refuse is refused here, before the job waits in the queue: an inline JSON
body is validated with the same pydantic models `POST /invocations` uses, `"stream": true` is
refused (an async answer is one stored body), and a `file://` input must lie in the allowed
folders. A finished job's output answers 200 whatever the outcome — the request for the answer
succeeded — and `X-Job-Status` says whether it is the success body or the error body, as
SageMaker leaves either object in S3 for the client to GET.

`/async-invocations*` take the endpoint's API key (Bearer or x-api-key); `/async/*` are open
(the service listens on 127.0.0.1 only, and the router guards `/async/stats`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import stat
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException
from starlette.types import Lifespan

from twinserve.api_keys import require_key
from twinserve.deploy.async_config import MAX_INVOCATION_TIMEOUT_S, MAX_TTL_S
from twinserve.errors import (
    ClientError,
    ConflictError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
    TwinserveError,
    ValidationError,
)
from twinserve.jobs.async_settings import AsyncSettings, LiveEndpoint
from twinserve.jobs.locations import file_path, parse_s3
from twinserve.jobs.model import MAX_INLINE_BODY_BYTES, Job, JobStatus, new_inference_id
from twinserve.jobs.queue import JobQueue
from twinserve.jobs.results import ResultStore, check_inference_id
from twinserve.server.errors import InternalError, error_response
from twinserve.server.json_body import decode_json_body
from twinserve.server.middleware import declares_more_than
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi
from twinserve.server.protocol.validation import validation_error

log = logging.getLogger(__name__)

INPUT_LOCATION_HEADER = "X-Input-Location"
INFERENCE_ID_HEADER = "X-Inference-Id"
TTL_HEADER = "X-Request-TTL-Seconds"
TIMEOUT_HEADER = "X-Invocation-Timeout-Seconds"
JOB_STATUS_HEADER = "X-Job-Status"
_DEFAULT_TYPE = "application/json"
_DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 6 * 3600, 12 * 3600)


# ------------------------------------------------------------------ what the workers show


class WorkerView(Protocol):
    """What the front shows of the workers in `/async/stats` (the service's `AsyncWorker`)."""

    @property
    def healthy(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def stopping(self) -> bool: ...


class AsyncMetrics:
    """The job service's Prometheus metrics, in a registry of its own (one service per endpoint)."""

    OUTCOMES = ("succeeded", "failed", "retried", "lease_lost")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "twinserve_async_queue_depth", "Jobs queued or running.", ["endpoint", "status"], registry=r
        )
        self.backlog_per_replica = Gauge(
            "twinserve_async_backlog_per_replica",
            "Backlog (queued + running) per healthy replica; the whole backlog at 0 replicas.",
            ["endpoint"],
            registry=r,
        )
        self.job_duration = Histogram(
            "twinserve_async_job_duration_seconds",
            "From submit to a final status (succeeded or failed), retries included.",
            ["endpoint"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            "twinserve_async_jobs", "Job attempts by outcome.", ["endpoint", "outcome"], registry=r
        )
        self.notifications = Counter(
            "twinserve_async_notifications", "Webhook notifications by outcome.", ["outcome"], registry=r
        )
        for outcome in self.OUTCOMES:
            self.jobs.labels(endpoint, outcome)
        for outcome in ("delivered", "failed"):
            self.notifications.labels(outcome)

    def job(self, outcome: str, created_at: datetime | None = None, now: datetime | None = None) -> None:
        """Count one attempt's outcome; a final one (with `created_at`) also times the job."""
        self.jobs.labels(self.endpoint, outcome).inc()
        if created_at is not None and now is not None:
            self.job_duration.labels(self.endpoint).observe(max(0.0, (now - created_at).total_seconds()))

    def notified(self, delivered: bool) -> None:
        self.notifications.labels("delivered" if delivered else "failed").inc()

    def exposition(self, counts: Mapping[JobStatus, int], healthy: int) -> bytes:
        for status in (JobStatus.QUEUED, JobStatus.RUNNING):
            self.queue_depth.labels(self.endpoint, status.value).set(counts.get(status, 0))
        backlog = sum(n for s, n in counts.items() if s.is_backlog)
        self.backlog_per_replica.labels(self.endpoint).set(backlog / max(healthy, 1))
        return generate_latest(self.registry)


# ------------------------------------------------------------------ wire models


class SubmitResponse(BaseModel):
    """The 202 answer of `POST /async-invocations` (also in headers: X-Output-Location, …)."""

    inference_id: str
    status: JobStatus
    output_location: str = Field(description="Where the answer will be once succeeded.")
    failure_location: str = Field(description="Where the error body will be if it fails.")


class JobView(BaseModel):
    """`GET /async-invocations/{id}`: the job's progress (never its input)."""

    inference_id: str
    status: JobStatus
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    failure_reason: str | None
    output_location: str
    failure_location: str


class StatsView(BaseModel):
    """`GET /async/stats`: what the controller scales on (`backlog`) and what the workers do."""

    backlog: int = Field(description="Jobs queued or running.")
    counts: dict[str, int] = Field(description="Jobs per status.")
    replicas: int = Field(description="Replicas the router reports healthy (and not draining).")
    capacity: int = Field(description="Jobs the workers may run at once (K × replicas).")
    in_flight: int = Field(description="Jobs the workers run now.")


# ------------------------------------------------------------------ validation


def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` → `application/json` (lowercase, no parameters)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    kind = media_type(content_type)
    return kind == "application/json" or kind.endswith("+json")


def check_invocation_body(body: bytes, content_type: str | None) -> None:
    """Refuse (ValidationError) a body `POST /invocations` would refuse without running the
    model, or one it would stream: JSON object, one of inputs/messages/prompt, valid fields."""
    if not is_json(content_type):
        raise ValidationError(
            f"POST /invocations takes application/json, not {media_type(content_type)!r}",
            param="content-type",
        )
    value = decode_json_body(body)
    if not isinstance(value, dict):
        raise ValidationError("the body must be a JSON object")
    model: type[BaseModel]
    if "messages" in value:
        model = oai.ChatCompletionRequest
    elif "prompt" in value:
        model = oai.CompletionRequest
    elif "inputs" in value:
        model = tgi.GenerateRequest
    else:
        raise ValidationError("the body needs `inputs` (TGI), `messages` (chat) or `prompt` (completion)")
    try:
        parsed = model.model_validate(value)
    except PydanticValidationError as exc:
        raise validation_error(exc.errors()) from exc
    if getattr(parsed, "stream", False):
        raise ValidationError(
            "`stream` is not supported on async invocations: the answer is stored as one body "
            "(poll GET /async-invocations/{id}/output or use a webhook)",
            param="stream",
        )


def _seconds(headers: Mapping[str, str], name: str, default: float, most: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= most):
        raise ValidationError(
            f"{name} must be a number of seconds in (0, {most:g}], not {raw[:50]!r}", param=name
        )
    return value


def check_input_location(location: str, roots: tuple[Path, ...], limit: int) -> None:
    """A location the worker will be able to read: s3:// syntax, or an existing regular file
    inside `roots` (422, the same answer whether or not a file outside exists) of at most
    `limit` bytes (413). Nothing is read here."""
    param = "X-Input-Location"
    if location.startswith("s3://"):
        _, key = parse_s3(location, param=param)
        if not key or key.endswith("/"):
            raise ValidationError(
                f"an s3:// input location names an object, not {location[:200]!r}", param=param
            )
        return
    if not location.startswith("file:"):
        raise ValidationError(
            f"an input location is s3://bucket/key or file:///abs/path, not {location[:200]!r}", param=param
        )
    path = file_path(location, param=param)
    if ".." in path.parts:
        raise ValidationError(f"an input location must not contain '..': {location[:200]!r}", param=param)
    try:
        resolved = path.resolve()
        inside = any(resolved.is_relative_to(root) for root in roots)
        info = os.stat(resolved) if inside else None
    except (OSError, RuntimeError) as exc:
        raise ValidationError(f"no readable input at {location[:200]!r}", param=param) from exc
    if info is None:
        raise ValidationError(
            f"{location[:200]!r} is outside the folders this endpoint reads inputs from", param=param
        )
    if not stat.S_ISREG(info.st_mode):
        raise ValidationError(f"the input at {location[:200]!r} is not a regular file", param=param)
    if info.st_size > limit:
        raise PayloadTooLargeError(
            f"the input at {location[:200]} is {info.st_size} bytes, over the limit of {limit}"
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body; PayloadTooLargeError as soon as it is known to pass `limit` bytes."""
    too_large = PayloadTooLargeError(
        f"an inline body is at most {limit} bytes; send larger inputs by X-Input-Location"
    )
    if declares_more_than(request.scope, limit):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ the app


class _Front:
    """The state the routes share: settings, the live endpoint, the queue and the result store."""

    def __init__(
        self,
        settings: AsyncSettings,
        live: LiveEndpoint,
        queue: JobQueue,
        results: ResultStore,
        metrics: AsyncMetrics,
        worker: WorkerView | None,
    ) -> None:
        self.settings, self.live, self.queue, self.results = settings, live, queue, results
        self.metrics, self.worker = metrics, worker

    @property
    def inline_limit(self) -> int:
        # a body over the replicas' own payload limit would only fail with 413 after its wait
        return min(MAX_INLINE_BODY_BYTES, self.live.endpoint.config.payload_limit)

    async def job(self, inference_id: str) -> Job:
        """The job of this endpoint; 404 for an unknown id or one of another endpoint."""
        try:
            job = await asyncio.to_thread(self.queue.get, inference_id)
        except NotFoundError:
            job = None
        if job is None or job.endpoint != self.settings.endpoint:
            raise NotFoundError(
                f"no async inference {inference_id[:200]!r} on endpoint {self.settings.endpoint!r}"
            )
        return job

    def locations(self, job: Job) -> tuple[str, str]:
        return (
            job.output_location or self.results.location_for(job.inference_id),
            job.failure_location or self.results.location_for(job.inference_id, failed=True),
        )

    async def new_job(self, request: Request) -> Job:
        """The job a submit asks for, validated (422/413) but not yet queued."""
        config, headers = self.settings.config, request.headers
        body = await _read_body(request, self.inline_limit)
        location = headers.get(INPUT_LOCATION_HEADER)
        if bool(body) == bool(location):
            raise ValidationError(
                "send the input either inline (the body) or by X-Input-Location (with an empty body), "
                + ("not both" if body else "one is needed"),
                param="X-Input-Location",
            )
        inference_id = check_inference_id(headers.get(INFERENCE_ID_HEADER) or new_inference_id())
        content_type = headers.get("content-type") or _DEFAULT_TYPE
        if body:
            check_invocation_body(body, content_type)
        else:
            assert location is not None
            check_input_location(location, self.settings.input_roots, self.live.endpoint.config.payload_limit)
        return Job(
            inference_id=inference_id,
            endpoint=self.settings.endpoint,
            content_type=content_type,
            accept=headers.get("accept") or _DEFAULT_TYPE,
            body=body or None,
            input_location=location or None,
            ttl_s=_seconds(headers, TTL_HEADER, config.request_ttl_s, MAX_TTL_S),
            invocation_timeout_s=_seconds(
                headers, TIMEOUT_HEADER, config.invocation_timeout_s, MAX_INVOCATION_TIMEOUT_S
            ),
            max_attempts=config.max_attempts,
        )

    async def stats(self) -> StatsView:
        counts = await asyncio.to_thread(self.queue.counts, self.settings.endpoint)
        worker = self.worker
        return StatsView(
            backlog=sum(n for s, n in counts.items() if s.is_backlog),
            counts={s.value: n for s, n in counts.items()},
            replicas=worker.healthy if worker else 0,
            capacity=worker.capacity if worker else 0,
            in_flight=worker.in_flight if worker else 0,
        )


def _front(request: Request) -> _Front:
    front: _Front = request.app.state.front
    return front


async def check_key(request: Request) -> None:
    """The endpoint's API key (it may change with an update: read from the live record)."""
    require_key(request.headers, _front(request).live.api_key)


jobs_router = APIRouter(dependencies=[Depends(check_key)])
ops_router = APIRouter()


@jobs_router.post("/async-invocations", status_code=202, response_model=SubmitResponse)
async def submit(request: Request) -> Response:
    """Queue one inference; answered once the job is durable."""
    front = _front(request)
    if front.worker is not None and front.worker.stopping:
        raise NotReadyError("the job service is stopping; submit again in a moment")
    job = await front.new_job(request)
    stored = await asyncio.to_thread(front.queue.submit, job)
    if stored.endpoint != job.endpoint:
        raise ConflictError(f"inference id {job.inference_id!r} is already used by another endpoint")
    output, failure = front.locations(stored)
    log.info("queued %s (%s)", stored.inference_id, "inline" if job.body else "by location")
    answer = SubmitResponse(
        inference_id=stored.inference_id,
        status=stored.status,
        output_location=output,
        failure_location=failure,
    )
    headers = {
        "X-Output-Location": output,
        "X-Failure-Location": failure,
        "Location": f"/async-invocations/{stored.inference_id}",
    }
    return JSONResponse(answer.model_dump(mode="json"), status_code=202, headers=headers)


@jobs_router.get("/async-invocations/{inference_id}", response_model=JobView)
async def describe(inference_id: str, request: Request) -> JobView:
    front = _front(request)
    job = await front.job(inference_id)
    output, failure = front.locations(job)
    return JobView(
        inference_id=job.inference_id,
        status=job.status,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        failure_reason=job.failure_reason,
        output_location=output,
        failure_location=failure,
    )


@jobs_router.get("/async-invocations/{inference_id}/output")
async def output(inference_id: str, request: Request) -> Response:
    """The stored answer (success or error body, told apart by X-Job-Status); 409 while unfinished."""
    front = _front(request)
    job = await front.job(inference_id)
    if not job.status.is_final:
        raise ConflictError(
            f"async inference {job.inference_id} is {job.status.value}: no answer yet "
            f"(poll GET /async-invocations/{job.inference_id}, or use a webhook)"
        )
    headers = {JOB_STATUS_HEADER: job.status.value}
    if job.status is JobStatus.SUCCEEDED and job.output_location:
        body = await asyncio.to_thread(front.results.get, job.output_location)
        kind = job.accept if "*" not in job.accept else _DEFAULT_TYPE
        return Response(body, media_type=kind, headers=headers)
    if job.failure_location:
        body = await asyncio.to_thread(front.results.get, job.failure_location)
    else:  # expired, or a lease that ran out on the last attempt: no error body was written
        error = tgi.ErrorResponse(
            error=job.failure_reason or f"async inference {job.status.value}", error_type=job.status.value
        )
        body = error.model_dump_json().encode()
    return Response(body, media_type=_DEFAULT_TYPE, headers=headers)


@ops_router.get("/async/health")
async def health(request: Request) -> Response:
    front = _front(request)
    try:
        await asyncio.to_thread(front.queue.counts, front.settings.endpoint)
    except Exception as exc:
        log.warning("health: the job queue does not answer: %s", type(exc).__name__)
        raise NotReadyError("the job queue does not answer") from exc
    stopping = front.worker is not None and front.worker.stopping
    return JSONResponse({"status": "ok", "stopping": stopping})


@ops_router.get("/async/stats", response_model=StatsView)
async def stats(request: Request) -> StatsView:
    return await _front(request).stats()


@ops_router.get("/async/metrics")
async def metrics(request: Request) -> Response:
    front = _front(request)
    counts = await asyncio.to_thread(front.queue.counts, front.settings.endpoint)
    healthy = front.worker.healthy if front.worker else 0
    return Response(front.metrics.exposition(counts, healthy), media_type=CONTENT_TYPE_LATEST)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in TGI's shape `{"error", "error_type"}` with its status from the error tree."""

    @app.exception_handler(TwinserveError)
    async def _ours(request: Request, exc: TwinserveError) -> Response:
        headers = {"retry-after": "1"} if isinstance(exc, ConflictError) and request.method == "GET" else None
        return error_response(exc, "tgi", headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc.errors()), "tgi")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        error: TwinserveError
        if exc.status_code == 404:
            error = NotFoundError(f"no route {request.method} {request.url.path}")
        else:
            error = ClientError(str(exc.detail))
            error.status_code = exc.status_code
        return error_response(error, "tgi", headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        request_id = request.headers.get("x-request-id")
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError(request_id), "tgi")


def create_async_app(
    settings: AsyncSettings,
    live: LiveEndpoint,
    queue: JobQueue,
    results: ResultStore,
    *,
    metrics: AsyncMetrics | None = None,
    worker: WorkerView | None = None,
    lifespan: Lifespan[FastAPI] | None = None,
) -> FastAPI:
    """The front as an ASGI app; `lifespan` runs the workers beside it (the service passes it)."""
    app = FastAPI(title="twinserve async jobs", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.front = _Front(
        settings, live, queue, results, metrics or AsyncMetrics(settings.endpoint), worker
    )
    app.include_router(jobs_router)
    app.include_router(ops_router)
    _install_error_handlers(app)
    return app
