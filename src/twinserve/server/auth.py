"""Bearer API key on the generation routes (health, info and metrics stay open).

`key_matches` is the one check: the server's routes, the endpoint router and an async
endpoint's job service all accept `Authorization: Bearer KEY` or `x-api-key: KEY`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import Request

from twinserve.errors import UnauthorizedError

INVALID_KEY = "missing or invalid API key (send `Authorization: Bearer <key>`)"


def key_matches(headers: Mapping[str, str], key: str) -> bool:
    """The request (`headers` by lowercase name) carries `key`, compared in constant time; the key
    itself never appears in a message or a log."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        given = headers.get("x-api-key", "")
    return bool(given) and hmac.compare_digest(given.strip().encode(), key.encode())


def require_key(headers: Mapping[str, str], key: str | None) -> None:
    """UnauthorizedError unless `key` is None (an open endpoint) or the request carries it."""
    if key is not None and not key_matches(headers, key):
        raise UnauthorizedError(INVALID_KEY)


async def check_api_key(request: Request) -> None:
    """FastAPI dependency; a no-op when the server has no key (async: no threadpool hop)."""
    require_key(request.headers, request.app.state.api_key)
