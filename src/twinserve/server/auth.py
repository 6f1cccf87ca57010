"""Bearer API key on the generation routes (health, info and metrics stay open)."""

from __future__ import annotations

from fastapi import Request

from twinserve.api_keys import require_key


async def check_api_key(request: Request) -> None:
    """FastAPI dependency; a no-op when the server has no key (async: no threadpool hop)."""
    require_key(request.headers, request.app.state.api_key)
