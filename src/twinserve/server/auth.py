"""Bearer API key on the generation routes (health, info and metrics stay open)."""

from __future__ import annotations

import hmac

from fastapi import Request

from twinserve.errors import UnauthorizedError


async def check_api_key(request: Request) -> None:
    """FastAPI dependency; a no-op when the server has no key (async: no threadpool hop)."""
    key = request.app.state.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        given = request.headers.get("x-api-key", "")
    # constant-time comparison; the key itself never appears in a message or a log
    if not given or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise UnauthorizedError("missing or invalid API key (send `Authorization: Bearer <key>`)")
