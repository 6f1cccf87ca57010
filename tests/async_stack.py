"""A real async endpoint for tests, in threads: router → job service (front + workers) → replica.

What `LocalPlatform` runs as processes, assembled from the same parts: the endpoint's record in a
real state store (its `url` the router's), a `RouterApp` in front of the given replica with its
`async_upstream` set to the job service, and the job service itself (`create_async_app` over the
endpoint's real SQLite queue and folder results, with an `AsyncWorker` running in its lifespan).
A replica URL nothing listens on gives an endpoint with no healthy replica: jobs stay queued, as
on an endpoint scaled to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from tests.servers import asgi_in_thread
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus, ReplicaRecord, ReplicaState
from twinserve.deploy.state import StateStore
from twinserve.jobs.async_front import create_async_app
from twinserve.jobs.async_settings import AsyncSettings, LiveEndpoint
from twinserve.jobs.async_worker import AsyncWorker, WorkerOptions
from twinserve.jobs.queue import JobQueue
from twinserve.jobs.results import ResultStore
from twinserve.platforms.local.router.app import create_router_app
from twinserve.platforms.local.router.pool import ReplicaPool, ReplicaSpec


@dataclass
class AsyncStack:
    """One running async endpoint: its router's URL (the endpoint's), its queue and results."""

    name: str
    url: str
    job_service_url: str
    queue: JobQueue
    results: ResultStore
    settings: AsyncSettings


def put_endpoint(
    store: StateStore, name: str, url: str | None, replica_url: str | None, **config: Any
) -> Endpoint:
    """The endpoint's record as the local platform writes it (InService, one healthy replica)."""
    cfg = EndpointConfig.model_validate({"name": name, "variants": [{"model": "tiny"}], **config})
    endpoint = Endpoint.new(cfg).model_copy(update={"status": EndpointStatus.IN_SERVICE, "url": url})
    store.put_endpoint(endpoint)
    if replica_url is not None:
        port = int(replica_url.rsplit(":", 1)[1])
        record = ReplicaRecord(
            id=f"{name}-primary-1", endpoint=name, variant="primary", port=port, url=replica_url
        )
        store.put_replica(record.model_copy(update={"state": ReplicaState.HEALTHY}))
    return store.get_endpoint(name)


def _job_service(
    settings: AsyncSettings, live: LiveEndpoint, queue: JobQueue, results: ResultStore
) -> FastAPI:
    worker = AsyncWorker(
        settings, live, queue, results, settings.notifier(), options=WorkerOptions(poll_interval_s=0.05)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(worker.run())
        try:
            yield
        finally:
            await worker.drain(5.0)
            await task

    return create_async_app(settings, live, queue, results, worker=worker, lifespan=lifespan)


@contextlib.contextmanager
def async_stack(
    store: StateStore, home: Path, name: str, replica_url: str, **config: Any
) -> Iterator[AsyncStack]:
    """Endpoint `name` (async; `config` adds to its EndpointConfig) in front of `replica_url`."""
    config.setdefault("async", {})
    key = config.get("api_key")
    pool = ReplicaPool([ReplicaSpec(id=f"{name}-primary-1", url=replica_url, variant="primary")])
    router = create_router_app(pool, api_key=key, health_interval=0.2)
    with asgi_in_thread(router, f"test-router-{name}") as router_url:
        endpoint = put_endpoint(store, name, router_url, replica_url, **config)
        settings = AsyncSettings.of(endpoint, home=home, state_path=store.path)
        queue, results = settings.open_queue(), settings.open_results()
        live = LiveEndpoint(endpoint, store, refresh_s=0.2)
        with asgi_in_thread(_job_service(settings, live, queue, results), f"test-jobs-{name}") as jobs_url:
            router.async_upstream = jobs_url
            store.put_endpoint(store.get_endpoint(name).model_copy(update={"async_url": jobs_url}))
            yield AsyncStack(name, router_url, jobs_url, queue, results, settings)
