"""Error bodies back into twinserve's error tree, whichever wire format they came in.

The HTTP status picks the class (so a proxy's bare 503 is still a NotReadyError); the
body gives the message: TGI `{"error": str, "error_type": str}`, OpenAI `{"error":
{"message", "type", "code"}}`, or the raw text of anything else. Errors that arrive
inside a stream have no status of their own, so there the body's type decides.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from twinserve.errors import (
    ClientError,
    EngineDeadError,
    ModelError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServerError,
    TwinserveError,
    UnauthorizedError,
    UnreachableError,
    ValidationError,
)
from twinserve.server.protocol import openai as oai
from twinserve.server.protocol import tgi

_BY_STATUS: dict[int, type[TwinserveError]] = {
    400: ValidationError,  # OpenAI and vLLM answer bad parameters with 400
    401: UnauthorizedError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    422: ValidationError,
    424: ModelError,
    429: OverloadedError,
    500: ServerError,
    503: NotReadyError,
    504: RequestTimeoutError,
}

# error types in a body, for errors that arrive mid-stream (TGI's and our OpenAI names)
_BY_TYPE: dict[str, type[TwinserveError]] = {
    "validation": ValidationError,
    "invalid_request_error": ValidationError,
    "overloaded": OverloadedError,
    "rate_limit_exceeded": OverloadedError,
    "not_found": NotFoundError,
    "not_found_error": NotFoundError,
    "unauthorized": UnauthorizedError,
    "authentication_error": UnauthorizedError,
    "payload_too_large": PayloadTooLargeError,
    "generation": ModelError,
    "server_error": ModelError,
    "unhealthy": EngineDeadError,
    "not_ready": NotReadyError,
    "service_unavailable": EngineDeadError,
    # what an async job's stored error body says when its last attempt got no answer
    "timeout": RequestTimeoutError,
    "unreachable": UnreachableError,
}

_MAX_RAW = 500  # characters of a non-JSON error body kept in the message


def error_from_response(status: int, body: bytes, request_id: str | None = None) -> TwinserveError:
    """The error for a non-2xx answer."""
    message, kind = _message_and_type(_json_or_none(body))
    if message is None:
        text = body.decode("utf-8", errors="replace").strip()
        message = text[:_MAX_RAW] if text else f"HTTP {status}"
    cls = _BY_STATUS.get(status) or (ClientError if 400 <= status < 500 else ServerError)
    if status == 503 and kind == "unhealthy":  # 503 is loading/draining unless the engine is dead
        cls = EngineDeadError
    return _build(cls, message, status, request_id)


def error_from_event(payload: Any, request_id: str | None = None) -> TwinserveError | None:
    """The error carried by an SSE event, or None when the event is not an error."""
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    message, kind = _message_and_type(payload)
    code = payload["error"].get("code") if isinstance(payload["error"], dict) else None
    cls = _BY_STATUS.get(code) if isinstance(code, int) and code != 503 else None
    cls = cls or _BY_TYPE.get(kind or "", ServerError)
    return _build(cls, message or "the server reported an error mid-stream", None, request_id)


def _build(
    cls: type[TwinserveError], message: str, status: int | None, request_id: str | None
) -> TwinserveError:
    error = cls(message)
    if status is not None and status != error.status_code:
        error.status_code = status  # e.g. 400 for a ValidationError, 403 for a ClientError
    if request_id:
        error.add_note(f"request_id: {request_id}")
    return error


def _message_and_type(payload: Any) -> tuple[str | None, str | None]:
    if not isinstance(payload, dict):
        return None, None
    try:
        if isinstance(payload.get("error"), dict):
            body = oai.ErrorResponse.model_validate(payload).error
            return body.message, body.type
        flat = tgi.ErrorResponse.model_validate(payload)
        return flat.error, flat.error_type
    except PydanticValidationError:
        error = payload.get("error") or payload.get("detail") or payload.get("message")
        return (str(error) if error else None), None


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def malformed(what: str, exc: Exception) -> ServerError:
    """An answer that does not fit the wire format (wrong server, or a proxy's page)."""
    error = ServerError(f"malformed {what} from the server: {str(exc)[:_MAX_RAW]}")
    error.status_code = 502
    return error
