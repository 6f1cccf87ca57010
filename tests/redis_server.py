"""A real Redis server for tests: `redis-server` on 127.0.0.1 in a temporary folder, stopped at the end.

Uses Debian's `redis-server` (`.ci/run` installs it). Nothing is persisted (`--save ''`,
`--appendonly no`): a test server's data dies with it. Kept apart from tests/servers.py, which
imports the model server, so that queue tests do not pay for importing the engine.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.needs import missing_tool
from twinserve.server.process import free_port


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


def require_redis() -> None:
    """Skip the test where redis-server is missing; fail it in CI (see tests/needs.py)."""
    if not redis_available():
        missing_tool("redis-server not found (apt-get install redis-server)")


@contextlib.contextmanager
def redis_server(timeout: float = 15.0) -> Iterator[str]:
    """Yield `redis://127.0.0.1:PORT/0` of a fresh server; its log is in the message if it fails.

    Skips the calling test where redis-server is missing, fails it under CI=true."""
    import redis

    require_redis()

    binary = shutil.which("redis-server")
    assert binary, "redis-server not found (apt-get install redis-server)"
    root = Path(tempfile.mkdtemp(prefix="twinserve-redis-"))
    port = free_port()
    log = root / "redis.log"
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *args, "--dir", str(root), "--logfile", str(log)],
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start:\n{text}") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
