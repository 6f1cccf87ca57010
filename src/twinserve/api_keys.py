"""The one API-key check, for every HTTP service twinserve runs (the LLM server, the endpoint
router, an async endpoint's job service, the RAG service).

Each accepts `Authorization: Bearer KEY` or `x-api-key: KEY`, compared in constant time; the
key itself never appears in a message or a log.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from twinserve.errors import UnauthorizedError

INVALID_KEY = "missing or invalid API key (send `Authorization: Bearer <key>`)"


def key_matches(headers: Mapping[str, str], key: str) -> bool:
    """The request (`headers` by lowercase name) carries `key`."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        given = headers.get("x-api-key", "")
    return bool(given) and hmac.compare_digest(given.strip().encode(), key.encode())


def require_key(headers: Mapping[str, str], key: str | None) -> None:
    """UnauthorizedError unless `key` is None (an open service) or the request carries it."""
    if key is not None and not key_matches(headers, key):
        raise UnauthorizedError(INVALID_KEY)
