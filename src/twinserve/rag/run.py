"""Run the RAG app under uvicorn (SIGTERM/SIGINT: finish what is in flight, then exit 0)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from twinserve.logs import configure_logging

log = logging.getLogger("twinserve.rag")

DRAIN_TIMEOUT_S = 30


class _Server(uvicorn.Server):
    """SIGTERM (an orchestrator's stop) finishes what is in flight and exits 0: uvicorn alone
    re-raises the signal after its shutdown and dies with 143, which reads as a crash."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
        elif self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True


def run_rag(app: FastAPI, *, host: str, port: int, log_format: str = "json") -> None:
    """Blocking: serve `app` until a signal; the lifespan loads the embedder and opens the store
    before the port answers, so a listening RAG service is a ready one."""
    configure_logging(log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per LLM call would drown the log
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
        timeout_keep_alive=30,
        server_header=False,
    )
    log.info("serving rag", extra={"host": host, "port": port, "api_key": bool(app.state.api_key)})
    _Server(config).run()
