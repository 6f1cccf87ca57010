"""SageMaker Runtime's errors as the HTTP answers `LLMClient` already knows how to read.

An error that is an *answer* (the service or the container said no) becomes a `Response`
with the HTTP status it stands for, so `error_from_response` builds the same typed error as
over HTTP: a `ModelError` carries the container's own status and body (`OriginalStatusCode`,
`OriginalMessage`); the service's errors become a TGI-shaped body with a status picked by
their code. A call that failed on the way raises: `UnreachableError` (no connection; safe to
retry), `RequestTimeoutError` (no byte in time), `BadGatewayError` (a broken answer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    import urllib3.exceptions as urllib3_errors
    from botocore import exceptions as boto_errors
except ImportError as exc:  # pragma: no cover - exercised only without the [aws] extra
    raise ImportError("SageMakerTransport needs boto3: pip install 'twinserve[aws]'") from exc

from twinserve.errors import (
    BadGatewayError,
    RequestTimeoutError,
    ServerError,
    TwinserveError,
    UnauthorizedError,
    UnreachableError,
)

# the service's own error codes → (HTTP status for error_from_response, TGI error_type)
_BY_CODE: dict[str, tuple[int, str]] = {
    "ValidationError": (400, "validation"),
    "ThrottlingException": (429, "overloaded"),
    "ModelNotReadyException": (503, "not_ready"),  # SageMaker says 429; it means "loading"
    "ServiceUnavailable": (503, "not_ready"),
    "InternalFailure": (500, "server"),
    "InternalDependencyException": (502, "bad_gateway"),
}
# signatures and permissions: all "your credentials can't", i.e. UnauthorizedError
_AUTH_CODES = frozenset(
    {
        "AccessDeniedException",
        "ExpiredTokenException",
        "IncompleteSignatureException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
ClientError = boto_errors.ClientError


def error_response(exc: Any) -> Any:
    """A botocore `ClientError` as the `Response` the HTTP transport would have returned."""
    from twinserve.client.transport import Response  # the transport module imports httpx only

    response = exc.response
    error = response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message") or str(exc)
    meta = response.get("ResponseMetadata", {})
    headers = {k.lower(): v for k, v in meta.get("HTTPHeaders", {}).items()}
    if "x-request-id" not in headers and meta.get("RequestId"):
        headers["x-request-id"] = meta["RequestId"]
    if code == "ModelError":
        original = response.get("OriginalStatusCode")
        if isinstance(original, int):
            return Response(original, headers, str(response.get("OriginalMessage", "")).encode())
        return Response(424, headers, _body(message, "generation"))
    if code in _AUTH_CODES:
        return Response(401, headers, _body(message, "unauthorized"))
    status, kind = _BY_CODE.get(code, (int(meta.get("HTTPStatusCode") or 500), "server"))
    if code == "ValidationError":
        http = int(meta.get("HTTPStatusCode") or 400)
        if http == 413:
            status, kind = 413, "payload_too_large"
        elif "not found" in message.lower():
            status, kind = 404, "not_found"
    return Response(status, headers, _body(message, kind))


def stream_error(exc: Any) -> TwinserveError:
    """An exception event in a response stream (botocore's `EventStreamError`)."""
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message") or str(exc)
    if code == "ModelStreamError" and "ModelInvocationTimeExceeded" in message:
        return RequestTimeoutError(f"the model's stream timed out: {message}")
    if code == "ModelStreamError":
        return BadGatewayError(f"the model's stream broke off: {message}")
    failure = ServerError(f"SageMaker failed mid-stream ({code or 'unknown error'}): {message}")
    failure.status_code = 502 if code != "InternalStreamFailure" else 500
    return failure


@contextmanager
def translated(where: str) -> Iterator[None]:
    """botocore's (and urllib3's, mid-stream) failures as twinserve errors; never a credential."""
    try:
        yield
    except boto_errors.ConnectionError as exc:  # endpoint, connect timeout, proxy, TLS
        raise UnreachableError(f"cannot connect to {where}: {type(exc).__name__}") from exc
    except (boto_errors.ReadTimeoutError, urllib3_errors.ReadTimeoutError) as exc:
        raise RequestTimeoutError(f"no answer from {where} in time ({type(exc).__name__})") from exc
    except (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError) as exc:
        raise UnauthorizedError(f"no AWS credentials to call {where} ({type(exc).__name__})") from exc
    except (boto_errors.BotoCoreError, urllib3_errors.HTTPError) as exc:
        raise BadGatewayError(f"the call to {where} failed: {type(exc).__name__}: {exc}") from exc


def _body(message: str, kind: str) -> bytes:
    return json.dumps({"error": message, "error_type": kind}).encode()
