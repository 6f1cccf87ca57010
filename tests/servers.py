"""Real servers for tests: uvicorn on 127.0.0.1 in a thread, or `twinserve serve` in a process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import uvicorn

from tests.factories import SMALL_LIMITS
from twinserve.config import ServeConfig
from twinserve.deploy.lease import OperationHolder, this_host, utcnow
from twinserve.server.app import create_app
from twinserve.server.process import ServerProcess, free_port, wait_until_healthy
from twinserve.server.service import ModelService


def serve_config(model: Path | str, **overrides: Any) -> ServeConfig:
    """Small limits and fp32 (like tests.factories.engine_config), on a free local port."""
    values: dict[str, Any] = {
        "model": str(model),
        "host": "127.0.0.1",
        "port": free_port(),
        **SMALL_LIMITS,
        "log_format": "text",
        **overrides,
    }
    return ServeConfig(**values)


@dataclass
class ThreadServer:
    url: str
    service: ModelService
    config: ServeConfig


@contextlib.contextmanager
def thread_server(config: ServeConfig, timeout: float = 120.0) -> Iterator[ThreadServer]:
    """Serve `config` with uvicorn in a background thread; waits until /health is 200."""
    service = ModelService(config)
    app = create_app(config, service)
    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=config.resolved_port(), log_config=None, access_log=False)
    )
    thread = threading.Thread(target=uv.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{config.resolved_port()}"
    try:
        wait_healthy(url, timeout)
        yield ThreadServer(url, service, config)
    finally:
        uv.should_exit = True
        thread.join(30)


def wait_healthy(url: str, timeout: float) -> None:
    if not wait_until_healthy(url, timeout):
        raise TimeoutError(f"{url} not healthy after {timeout}s")


@contextlib.contextmanager
def process_server(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    wait: bool = True,
) -> Iterator[ServerProcess]:
    """`twinserve serve ARGS` as a real process on 127.0.0.1 (JSON logs); killed at the end."""
    server = ServerProcess(args, env={"TWINSERVE_LOG_FORMAT": "json", **(env or {})}, log_path=log_path)
    try:
        if wait:
            server.wait_healthy(timeout)
        yield server
    finally:
        server.kill()


def dead_holder() -> OperationHolder:
    """The lease holder of a process that ran and exited: an interrupted operation's."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return OperationHolder(
        host=this_host(), pid=proc.pid, started=0.0, expires_at=utcnow() + timedelta(hours=1)
    )


def process_gone(pid: int) -> bool:
    """No such process, or a zombie whose parent is not us (reaping orphans is init's job)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() != os.getpid()
    except psutil.NoSuchProcess:
        return True


def until(condition: Callable[[], Any], timeout: float = 15.0) -> bool:
    """Poll `condition` until it is true (True) or `timeout` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def asgi_in_thread(app: Any, name: str = "test-asgi") -> Iterator[str]:
    """An ASGI app under uvicorn in a thread on a free port of 127.0.0.1 (lifespan on); its URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    try:
        assert until(lambda: server.started, 30), f"{name} did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass
class ReceivedRequest:
    """One request a `webhook_receiver` got: its path, headers (lowercase names) and raw body."""

    path: str
    headers: dict[str, str]
    body: bytes


@contextlib.contextmanager
def webhook_receiver(status: int = 200) -> Iterator[tuple[str, list[ReceivedRequest]]]:
    """A real HTTP server on 127.0.0.1 in a thread that records every POST and answers `status`;
    yields its base URL and the list it appends to."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[ReceivedRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            received.append(ReceivedRequest(self.path, headers, body))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="test-webhook", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
