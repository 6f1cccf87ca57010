"""Run the app under uvicorn with a graceful drain on SIGTERM; exit 1 if the model can't load.

SIGTERM (Kubernetes, SageMaker, `docker stop`): health turns 503, the listening socket
closes, in-flight requests finish within `drain_timeout_s`, the engine stops, and the
process exits 0. uvicorn alone would re-raise the signal after its shutdown and die
with 143, which orchestrators report as a crash.
"""

from __future__ import annotations

import logging
import math
import signal
from types import FrameType

import uvicorn

from twinserve.config import ServeConfig
from twinserve.server.app import create_app
from twinserve.server.logs import configure_logging
from twinserve.server.service import ModelService, ServiceState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the service draining and exits 0 on SIGTERM."""

    def __init__(self, config: uvicorn.Config, service: ModelService) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM:
            if not self.should_exit:
                log.info(
                    "SIGTERM: draining", extra={"drain_timeout_s": self.config.timeout_graceful_shutdown}
                )
            self.service.begin_drain()
            self.should_exit = True  # not recorded as captured: nothing re-raised, exit 0
            return
        self.service.begin_drain()
        super().handle_exit(sig, frame)


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
    server = DrainingServer(uv_config, service)

    def stop_after_failed_load() -> None:
        # fail fast like TGI: an orchestrator sees the exit and the log says why
        server.should_exit = True

    service.on_load_failure = stop_after_failed_load
    server.run()
    if service.state is ServiceState.FAILED:
        raise SystemExit(1)
