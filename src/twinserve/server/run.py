"""Run the app under uvicorn with a graceful drain on SIGTERM; exit 1 when the model can't
load or the engine dies.

SIGTERM (Kubernetes, SageMaker, `docker stop`): health turns 503 and new generations are
refused with 503, but the port stays open for `drain_grace_s` (longer while requests are
in flight, up to `drain_timeout_s` more), so a load balancer's health check sees the
replica leave instead of a refused connection; then the socket closes, what is left
finishes, the engine stops, and the process exits 0. uvicorn alone would close at once
and re-raise the signal after its shutdown, dying with 143, which orchestrators report
as a crash. A FAILED service (load failure, dead engine) stops the server the same way
and exits 1, so its supervisor starts a fresh process.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from types import FrameType

import uvicorn

from twinserve.config import ServeConfig
from twinserve.logs import configure_logging
from twinserve.server.app import create_app
from twinserve.server.service import ModelService, ServiceState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains on SIGTERM while still listening, then exits 0."""

    def __init__(
        self, config: uvicorn.Config, service: ModelService, *, grace_s: float, drain_s: float
    ) -> None:
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s
        self.drain_s = drain_s
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM:
            if self.drain_started is None:
                log.info(
                    "SIGTERM: draining", extra={"grace_s": self.grace_s, "drain_timeout_s": self.drain_s}
                )
                self.drain_started = time.monotonic()
            self.service.begin_drain()  # not recorded as captured: nothing re-raised, exit 0
            return
        self.service.begin_drain()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            busy = self.service.requests_in_flight()
            if (waited >= self.grace_s and busy == 0) or waited >= self.grace_s + self.drain_s:
                # what is still running gets what remains of the drain timeout after the close
                left = self.grace_s + self.drain_s - waited
                self.config.timeout_graceful_shutdown = max(1, math.ceil(left))
                log.info(
                    "closing the listening socket", extra={"in_flight": busy, "after_s": round(waited, 1)}
                )
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServeConfig) -> None:
    """Blocking: serve until SIGTERM/SIGINT."""
    configure_logging(config.log_format)
    service = ModelService(config)
    app = create_app(config, service)
    host, port = config.resolved_host(), config.resolved_port()
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        # uvicorn counts whole seconds; a fraction rounds up, never to "no drain at all"
        timeout_graceful_shutdown=math.ceil(config.drain_timeout_s),
        # SSE clients may idle between tokens while queued; keep the connection
        timeout_keep_alive=30,
        server_header=False,
    )
    log.info(
        "serving",
        extra={"host": host, "port": port, "model": config.model, "api_key": bool(config.api_key)},
    )
    server = DrainingServer(uv_config, service, grace_s=config.drain_grace_s, drain_s=config.drain_timeout_s)

    def stop_after_failure() -> None:
        # fail fast like TGI: an orchestrator sees the exit and the log says why
        server.should_exit = True

    service.on_fatal = stop_after_failure
    server.run()
    if service.state is ServiceState.FAILED:
        raise SystemExit(1)
