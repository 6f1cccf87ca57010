"""One gateway process per twinserve home: start it if none runs, find it, stop it.

`home/endpoints/gateway.json` records its pid, port and state store. A recorded pid is
trusted only while its command line still runs the gateway module on that port for that
store (pids are reused; a stale record must never make us signal someone else's process),
and only once `/ping` answers. A file lock keeps two CLIs creating endpoints at once from
starting two gateways.

The port is `$TWINSERVE_GATEWAY_PORT` if set (an error if taken), else 8085, else any free one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from twinserve.deploy.state import StateStore
from twinserve.platforms.local.gateway.process import MODULE
from twinserve.platforms.local.processes import has_option, live_cmdline, terminate
from twinserve.server.process import free_port, probe_client, tail_lines

PORT_ENV = "TWINSERVE_GATEWAY_PORT"
DEFAULT_PORT = 8085
RECORD = "gateway.json"
LOG = "gateway.log"
_START_TIMEOUT_S = 30.0
# gateways this process started, waited on when stopped so none lingers here as a zombie
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class GatewayStartError(RuntimeError):
    """The gateway process did not come up (the message has its log's last lines)."""


@dataclass(frozen=True)
class GatewayRecord:
    pid: int
    port: int
    state: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def gateway_url(home: Path) -> str | None:
    """The URL of this home's running gateway, or None."""
    record = _read(home)
    return record.url if record is not None and _is_ours(record) else None


def ensure_gateway(store: StateStore, home: Path) -> str:
    """Start the gateway for `store` unless it already runs; its URL."""
    state = str(store.path.resolve())
    with _locked(home):
        record = _read(home)
        if record is not None and _is_ours(record):
            if record.state == state and _answers_within(record.url, 5.0):
                return record.url
            # a home has one gateway: this one serves another store, or hangs
            terminate(record.pid, 10.0)
            _reap(record.pid)
        try:
            record = _start(home, state, _port())
        except GatewayStartError:
            if os.environ.get(PORT_ENV):
                raise
            record = _start(home, state, free_port())  # 8085 was taken between check and bind
        _write(home, record)
        return record.url


def stop_gateway(home: Path, timeout: float = 10.0) -> bool:
    """Stop this home's gateway (in-flight calls get `timeout` s); False if none ran."""
    with _locked(home):
        record = _read(home)
        stopped = record is not None and _is_ours(record)
        if stopped:
            assert record is not None
            terminate(record.pid, timeout)
            _reap(record.pid)
        with contextlib.suppress(FileNotFoundError):
            (home / "endpoints" / RECORD).unlink()
        return stopped


def _start(home: Path, state: str, port: int) -> GatewayRecord:
    folder = home / "endpoints"
    cmd = [sys.executable, "-m", MODULE, "--port", str(port), "--state", state]
    with (folder / LOG).open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    record = GatewayRecord(proc.pid, port, state)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _answers(record.url) and _is_ours(record):
            _CHILDREN[proc.pid] = proc
            return record
        time.sleep(0.1)
    if proc.poll() is None:
        terminate(proc.pid, 5.0)
    proc.wait(10)
    log = tail_lines(folder / LOG, 10)
    raise GatewayStartError(f"the SageMaker Runtime gateway did not start on port {port}:\n{log}")


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(5.0)


def _port() -> int:
    configured = os.environ.get(PORT_ENV)
    if configured:
        port = int(configured)
        if not _free(port):
            raise GatewayStartError(f"port {port} (${PORT_ENV}) is in use")
        return port
    return DEFAULT_PORT if _free(DEFAULT_PORT) else free_port()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _is_ours(record: GatewayRecord) -> bool:
    cmdline = live_cmdline(record.pid)
    return (
        cmdline is not None
        and MODULE in cmdline
        and has_option(cmdline, "--port", str(record.port))
        and has_option(cmdline, "--state", record.state)
    )


def _answers(url: str) -> bool:
    try:
        return probe_client().get(f"{url}/ping", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _answers_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _answers(url):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _read(home: Path) -> GatewayRecord | None:
    try:
        data = json.loads((home / "endpoints" / RECORD).read_text())
        return GatewayRecord(int(data["pid"]), int(data["port"]), str(data["state"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _write(home: Path, record: GatewayRecord) -> None:
    path = home / "endpoints" / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(path)  # a reader never sees half a record


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    folder = home / "endpoints"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (folder / "gateway.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
