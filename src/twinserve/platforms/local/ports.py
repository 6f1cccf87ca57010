"""The ports of an endpoint's helper processes: a restarted router or job service takes its old
port back when it can, so its URL (the endpoint's, or the router's upstream) stays the same."""

from __future__ import annotations

import socket
import time

from twinserve.errors import PortTakenError
from twinserve.server.process import free_port

# how long a restart waits for its old port: a killed process's port can be held for a moment
# by the kernel, or by an outgoing connection that drew it as its ephemeral source port
RECLAIM_WAIT_S = 5.0


def port_of(url: str | None) -> int | None:
    """The port of `http://127.0.0.1:PORT[/…]`, or None."""
    if not url:
        return None
    try:
        return int(url.rsplit(":", 1)[1].split("/")[0])
    except (IndexError, ValueError):
        return None


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound now."""
    with socket.socket() as s:
        # as uvicorn binds: connections of the dead process in TIME_WAIT must not block the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reclaim_port(url: str | None, wait_s: float = RECLAIM_WAIT_S, *, required: bool = False) -> int:
    """The port of `url` once it can be bound (waiting up to `wait_s`), else a new free one, or
    with `required` (a URL clients use) PortTakenError."""
    port = port_of(url)
    if port is not None:
        deadline = time.monotonic() + wait_s
        while True:
            if port_free(port):
                return port
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if required:
            raise PortTakenError(
                f"port {port} of {url} is held by another process: the router cannot start there, "
                "and moving would change the endpoint's URL"
            )
    return free_port()
