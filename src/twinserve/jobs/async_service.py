"""An async endpoint's job service as its own process: `python -m twinserve.jobs.async_service`.

```
python -m twinserve.jobs.async_service --endpoint NAME --port P --state STATE_DB --home HOME
       [--visibility-timeout S (default: async.lease_timeout_s)] [--poll-interval 0.2]
```
One process per async endpoint, beside its router (the local control plane starts, probes and
stops it; see `twinserve.platforms.local.job_service`). It serves the front
(`twinserve.jobs.async_front`) with uvicorn on 127.0.0.1:P and runs the workers
(`twinserve.jobs.async_worker`) in the same event loop, as a lifespan task.

SIGTERM / SIGINT: leasing stops at once; the front keeps answering (submits get 503, polls
work) while the running jobs finish, for at most the endpoint's `drain_timeout_s`; jobs still
running then are cut short and left to their lease, so another worker gets them again. Then,
if the endpoint is being deleted (status Deleting, or its record is gone), its queue is purged
— its results stay where they are, the user's to keep. Exit 0 (1 if the workers crashed, so
reconcile starts a fresh process). A second SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from twinserve.deploy.spec import EndpointStatus
from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError, TwinserveError
from twinserve.jobs.async_front import AsyncMetrics, create_async_app
from twinserve.jobs.async_settings import AsyncSettings, LiveEndpoint
from twinserve.jobs.async_worker import AsyncWorker, WorkerOptions
from twinserve.jobs.queue import JobQueue
from twinserve.platforms.local.daemons import configure_logging

log = logging.getLogger("twinserve.jobs.service")

MODULE = "twinserve.jobs.async_service"
# HTTP requests in progress when the socket closes get this long (polls and submits are short)
_HTTP_GRACE_S = 5


class JobServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the workers before the socket closes."""

    def __init__(self, config: uvicorn.Config, worker: AsyncWorker, drain_s: float) -> None:
        super().__init__(config)
        self.worker = worker
        self.drain_s = drain_s
        self.stop_requested: float | None = None
        self.failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_requested is None:
            log.info("%s: no more leases; draining for up to %.0f s", signal.Signals(sig).name, self.drain_s)
            self.stop_requested = time.monotonic()
            self.worker.request_stop()
            return  # not recorded as captured: uvicorn re-raises nothing, the exit code is 0
        if sig == signal.SIGINT:
            super().handle_exit(sig, frame)  # a second Ctrl-C: uvicorn's forced exit

    def drain_left(self) -> float:
        """Seconds of the drain still to go (all of it if no signal came)."""
        if self.stop_requested is None:
            return 0.0
        return max(0.0, self.drain_s - (time.monotonic() - self.stop_requested))

    def fail(self) -> None:
        """The workers crashed: stop serving and exit 1."""
        self.failed = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        draining = self.stop_requested is not None and not self.should_exit
        if draining and (self.worker.in_flight == 0 or self.drain_left() <= 0):
            self.should_exit = True
        return await super().on_tick(counter)


def _lifespan(
    worker: AsyncWorker, server: list[JobServer]
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Run the workers beside the front; on shutdown, drain what the signal left of the timeout."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(worker.run(), name="async-worker")

        def crashed(done: asyncio.Task[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("the workers stopped", exc_info=done.exception())
                server[0].fail()

        task.add_done_callback(crashed)
        try:
            yield
        finally:
            worker.request_stop()
            await worker.drain(server[0].drain_left())
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    return lifespan


def purge_if_deleted(store: StateStore, name: str, queue: JobQueue) -> bool:
    """Forget the endpoint's jobs if it is being deleted (or gone); True if purged."""
    try:
        deleting = store.get_endpoint(name).status is EndpointStatus.DELETING
    except NotFoundError:
        deleting = True
    if deleting:
        queue.purge(name)
        log.info("endpoint %s is being deleted: its queue is purged (results stay)", name)
    return deleting


def run(
    name: str,
    port: int,
    state: Path,
    home: Path,
    *,
    visibility_timeout_s: float | None = None,
    poll_interval_s: float = 0.2,
) -> int:
    """Serve until SIGTERM/SIGINT; the exit code."""
    store = StateStore(state)
    endpoint = store.get_endpoint(name)  # NotFoundError: nothing to serve
    settings = AsyncSettings.of(endpoint, home=home, state_path=state)
    queue, results, notifier = settings.open_queue(), settings.open_results(), settings.notifier()
    live = LiveEndpoint(endpoint, store)
    metrics = AsyncMetrics(name)
    lease_s = visibility_timeout_s or settings.config.lease_timeout_s
    options = WorkerOptions(visibility_timeout_s=lease_s, poll_interval_s=poll_interval_s)
    worker = AsyncWorker(settings, live, queue, results, notifier, metrics=metrics, options=options)
    holder: list[JobServer] = []
    app = create_async_app(
        settings, live, queue, results, metrics=metrics, worker=worker, lifespan=_lifespan(worker, holder)
    )
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=_HTTP_GRACE_S,
        server_header=False,
    )
    server = JobServer(config, worker, endpoint.config.drain_timeout_s)
    holder.append(server)
    log.info(
        "job service of %s on 127.0.0.1:%d (queue %s, results %s, %d input roots, %r)",
        name,
        port,
        settings.queue_url.split("://", 1)[0],
        settings.output_location.split("://", 1)[0],
        len(settings.input_roots),
        notifier,
    )
    try:
        server.run()
        purge_if_deleted(store, name, queue)
    finally:
        queue.close()
        notifier.close()
    return 1 if server.failed else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="Endpoint name in the state store.")
    parser.add_argument("--port", type=int, required=True, help="Port on 127.0.0.1.")
    parser.add_argument("--state", type=Path, required=True, help="The state store file (state.db).")
    parser.add_argument("--home", type=Path, required=True, help="TWINSERVE_HOME (results, inputs).")
    parser.add_argument(
        "--visibility-timeout",
        type=float,
        default=None,
        help="Seconds a lease lasts between heartbeats (default: the endpoint's async.lease_timeout_s).",
    )
    parser.add_argument("--poll-interval", type=float, default=0.2, help="Seconds between idle rounds.")
    args = parser.parse_args(argv)
    if args.visibility_timeout is not None and not (
        math.isfinite(args.visibility_timeout) and args.visibility_timeout > 0
    ):
        parser.error("--visibility-timeout must be > 0")
    if not (math.isfinite(args.poll_interval) and args.poll_interval > 0):
        parser.error("--poll-interval must be > 0")
    configure_logging()
    try:
        code = run(
            args.endpoint,
            args.port,
            args.state,
            args.home,
            visibility_timeout_s=args.visibility_timeout,
            poll_interval_s=args.poll_interval,
        )
    except TwinserveError as exc:  # no such endpoint, not an async one, a bad queue URL
        log.error("the job service of %s cannot start: %s", args.endpoint, exc.message)
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
