"""The ports of an endpoint's helper processes: a restarted router or job service takes its old
port back when it can, so its URL (the endpoint's, or the router's upstream) stays the same."""

from __future__ import annotations

import socket


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
