"""Errors on the wire: one mapping per protocol, from twinserve's error tree to a body.

TGI: `{"error": str, "error_type": str}`; OpenAI: `{"error": {message, type, param, code}}`.
The HTTP status comes from the error class, so a 429 is a 429 in every protocol.
"""

from __future__ import annotations

from typing import Any, Literal

from starlette.responses import JSONResponse

from twinserve.errors import TwinserveError
from twinserve.server.protocol import openai, tgi

Wire = Literal["tgi", "openai"]

# OpenAI's `type` names for our error types
_OPENAI_TYPES = {
    "validation": "invalid_request_error",
    "overloaded": "rate_limit_exceeded",
    "not_found": "not_found_error",
    "unauthorized": "authentication_error",
    "payload_too_large": "invalid_request_error",
    "generation": "server_error",
    "bad_gateway": "server_error",
    "unhealthy": "service_unavailable",
    "not_ready": "service_unavailable",
}


def tgi_error(exc: TwinserveError) -> tgi.ErrorResponse:
    return tgi.ErrorResponse(error=exc.message, error_type=exc.error_type)


def openai_error(exc: TwinserveError) -> openai.ErrorResponse:
    return openai.ErrorResponse(
        error=openai.ErrorBody(
            message=exc.message, type=_OPENAI_TYPES.get(exc.error_type, "server_error"), code=exc.status_code
        )
    )


def error_body(exc: TwinserveError, wire: Wire) -> tgi.ErrorResponse | openai.ErrorResponse:
    return openai_error(exc) if wire == "openai" else tgi_error(exc)


def error_response(exc: TwinserveError, wire: Wire, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_body(exc, wire)
    out_headers = dict(headers or {})
    if exc.status_code in (429, 503):
        out_headers.setdefault("retry-after", "1")
    if exc.status_code == 401:
        out_headers.setdefault("www-authenticate", "Bearer")
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=out_headers)


def describe_validation_errors(errors: Any) -> str:
    """One readable line per problem ("`parameters.top_p`: Input should be ..."), at most five."""
    lines = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"`{loc}`: {msg}" if loc else msg)
    return "; ".join(lines) or "invalid request"
