"""Errors on the wire: one mapping per protocol, from twinserve's error tree to a body.

TGI: `{"error": str, "error_type": str}`; OpenAI: `{"error": {message, type, param, code}}`.
The HTTP status comes from the error class, so a 429 is a 429 in every protocol, with one
exception that clients depend on: OpenAI and vLLM answer bad requests with **400** (the
openai SDK raises `BadRequestError` for it), where TGI answers 422. A prompt over the
context window is worded as each protocol's clients recognise it.
"""

from __future__ import annotations

from typing import Literal

from starlette.responses import Response

from twinserve.errors import ContextLengthError, ServerError, TwinserveError, ValidationError
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


class InternalError(ServerError):
    """What a client sees of a bug: a stable message and the request id, never internals."""

    error_type = "internal"

    def __init__(self, request_id: str | None) -> None:
        suffix = f" (request id {request_id})" if request_id else ""
        super().__init__(f"internal server error{suffix}; the server log has the details")


def status_for(exc: TwinserveError, wire: Wire) -> int:
    if wire == "openai" and isinstance(exc, ValidationError):
        return 400
    return exc.status_code


def tgi_error(exc: TwinserveError) -> tgi.ErrorResponse:
    return tgi.ErrorResponse(error=exc.message, error_type=exc.error_type)


def openai_error(exc: TwinserveError) -> openai.ErrorResponse:
    message, code, param = exc.message, status_for(exc, "openai"), getattr(exc, "param", None)
    code_name: int | str = code
    if isinstance(exc, ContextLengthError):
        message = (
            f"This model's maximum context length is {exc.limit} tokens. However, you requested "
            f"{exc.prompt_tokens + exc.new_tokens} tokens ({exc.prompt_tokens} in the messages, "
            f"{exc.new_tokens} in the completion). Please reduce the length of the messages or completion."
        )
        code_name = "context_length_exceeded"
    return openai.ErrorResponse(
        error=openai.ErrorBody(
            message=message,
            type=_OPENAI_TYPES.get(exc.error_type, "server_error"),
            param=param,
            code=code_name,
        )
    )


def error_body(exc: TwinserveError, wire: Wire) -> tgi.ErrorResponse | openai.ErrorResponse:
    return openai_error(exc) if wire == "openai" else tgi_error(exc)


def error_response(exc: TwinserveError, wire: Wire, headers: dict[str, str] | None = None) -> Response:
    status = status_for(exc, wire)
    out_headers = dict(headers or {})
    if status in (429, 503):
        out_headers.setdefault("retry-after", "1")
    if status == 401:
        out_headers.setdefault("www-authenticate", "Bearer")
    body = error_body(exc, wire).model_dump_json().encode()
    return Response(body, status_code=status, headers=out_headers, media_type="application/json")
