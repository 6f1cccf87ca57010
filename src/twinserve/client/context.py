"""`request_id(rid)`: one id for a piece of work across services (the RAG request and its LLM call).

A context variable, so it follows the code that runs inside the `with` block, across `await`s
and into tasks started there, without being passed down every call. `HttpTransport` sends it
as `x-request-id` on each request it makes inside the block (streams included); twinserve's
server keeps an incoming id that is 1–128 characters of `[A-Za-z0-9._:-]` and answers with it,
so its access log and the caller's share the id. Anything else would be dropped there for an id
of its own, silently: `request_id` refuses it here instead (ValueError). SageMaker Runtime takes
no request headers, so `SageMakerTransport` does not send it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CURRENT: ContextVar[str | None] = ContextVar("twinserve_request_id", default=None)
# what the server's RequestContextMiddleware keeps (server/middleware.py)
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@contextmanager
def request_id(rid: str | None = None) -> Iterator[str]:
    """Send `rid` (None: a new random one) as `x-request-id` on the requests made inside; yields it."""
    rid = uuid.uuid4().hex if rid is None else rid
    if not is_valid_request_id(rid):
        raise ValueError(f"a request id is 1-128 characters of letters, digits and ._:- (not {rid!r})")
    token = _CURRENT.set(rid)
    try:
        yield rid
    finally:
        _CURRENT.reset(token)


def is_valid_request_id(rid: str) -> bool:
    """Whether twinserve's servers keep `rid` as it is (the RAG service checks incoming ids with it)."""
    return _VALID.fullmatch(rid) is not None


def current_request_id() -> str | None:
    """The id of the innermost `request_id` block around the caller, if any."""
    return _CURRENT.get()
