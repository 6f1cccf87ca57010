"""`twinserve serve` as a child process: start on a free local port, wait for health, stop.

Used wherever a real server is needed next to the caller: the `demo` command, the HTTP
overhead benchmark, tests (and, later, local endpoint replicas).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx

from twinserve.errors import ModelLoadError

_SERVE = [sys.executable, "-c", "from twinserve.cli.serve import replica_app; replica_app()", "serve"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@functools.cache
def probe_client() -> httpx.Client:
    """One pooled client for health probes: control loops probe every second, and a new client
    per probe (`httpx.get`) costs more CPU than the probe itself. Thread-safe."""
    return httpx.Client(timeout=2.0)


def is_healthy(url: str, timeout: float = 2.0, *, path: str = "/health") -> bool:
    """`GET {url}{path}` answers 200 (a server, a replica or a router)."""
    try:
        return probe_client().get(f"{url}{path}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_healthy(
    url: str, timeout: float, *, gone: Callable[[], bool] = lambda: False, path: str = "/health"
) -> bool:
    """Poll until `path` (default `/health`) is 200 (True); False at the timeout or as soon as
    `gone()` says the process behind the URL has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            return False
        if is_healthy(url, path=path):
            return True
        time.sleep(0.1)
    return False


def tail_lines(path: Path, lines: int, *, keep: Callable[[str], bool] | None = None) -> str:
    """The last `lines` lines of a log file (those `keep` accepts), or "" when it doesn't exist."""
    if not path.exists():
        return ""
    with path.open(errors="replace") as f:
        return "".join(deque((line for line in f if keep is None or keep(line)), maxlen=lines))


class ServerProcess:
    """One `twinserve serve` child on 127.0.0.1; its output goes to `log_path` (or is dropped)."""

    def __init__(
        self,
        args: list[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # no grace period after SIGTERM: nothing balances load onto a child server but its
        # parent (the endpoint router drains a replica before stopping it); `args` may say otherwise
        cmd = [*_SERVE, "--host", "127.0.0.1", "--port", str(self.port), "--drain-grace", "0", *args]
        full_env = {**os.environ, **(env or {})}
        out: IO[bytes] | int = log_path.open("wb") if log_path else subprocess.DEVNULL
        # its own session: a signal to this process group never reaches the caller
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        if not isinstance(out, int):
            out.close()

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Block until `/health` is 200; ModelLoadError with the log's tail if it dies or times out."""
        if wait_until_healthy(self.url, timeout, gone=lambda: self.proc.poll() is not None):
            return
        if self.proc.poll() is not None:
            raise ModelLoadError(f"the server exited with {self.proc.returncode}: {self.log_tail()}")
        raise ModelLoadError(f"the server was not healthy after {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 10) -> str:
        if self.log_path is None:
            return "(no log)"
        return tail_lines(self.log_path, lines).rstrip("\n") or "(no log)"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains and exits 0), SIGKILL to the group if it overstays."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc[0] is not None else self.stop()
