"""SageMaker Runtime's error answers, shaped so that botocore raises the modeled exceptions.

sagemaker-runtime is a rest-json service: botocore takes the error code from the
`x-amzn-ErrorType` header and the modeled fields from the JSON body, so
`ModelError` (424) arrives as `client.exceptions.ModelError` with `OriginalStatusCode`,
`OriginalMessage` and `LogStreamArn` in `error.response`, and `ValidationError` (400) as
`client.exceptions.ValidationError`. Codes the model does not list (`AccessDeniedException`,
`InvalidSignatureException`, …) still arrive as a `ClientError` with that code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ACCOUNT = "000000000000"  # the account id local endpoints answer for in messages and ARNs
JSON = "application/json"
ORIGINAL_MESSAGE_LIMIT = 64 * 1024  # characters of the container's error body kept


@dataclass
class AwsError(Exception):
    """An error answer: HTTP status, AWS error code, message and extra modeled body fields."""

    status: int
    code: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def body(self) -> bytes:
        return json.dumps({**self.fields, "Message": self.message}).encode()

    def raw_headers(self, request_id: str) -> list[tuple[bytes, bytes]]:
        body_length = str(len(self.body())).encode()
        out = [
            (b"content-type", JSON.encode()),
            (b"content-length", body_length),
            (b"x-amzn-errortype", self.code.encode()),
            (b"x-amzn-requestid", request_id.encode("latin-1")),
        ]
        return out + [(k.encode(), v.encode("latin-1")) for k, v in self.headers.items()]


def not_found(name: str) -> AwsError:
    return AwsError(400, "ValidationError", f"Endpoint {name} of account {ACCOUNT} not found.")


def validation(message: str, status: int = 400) -> AwsError:
    return AwsError(status, "ValidationError", message)


def service_unavailable(message: str) -> AwsError:
    return AwsError(503, "ServiceUnavailable", message, headers={"retry-after": "1"})


def internal_failure(message: str) -> AwsError:
    return AwsError(500, "InternalFailure", message)


def access_denied(code: str, message: str) -> AwsError:
    return AwsError(403, code, message)


def log_stream_arn(endpoint: str) -> str:
    return f"arn:aws:logs:local:{ACCOUNT}:log-group:/aws/sagemaker/Endpoints/{endpoint}"


def model_error(
    endpoint: str, status: int, original: str, *, container: str = "primary", retry_after: str | None = None
) -> AwsError:
    """The container answered `status` (4xx/5xx) with `original`: SageMaker's 424 ModelError."""
    original = original[:ORIGINAL_MESSAGE_LIMIT]
    side, code = (
        ("client", "CLIENT_ERROR_FROM_MODEL") if status < 500 else ("server", "SERVER_ERROR_FROM_MODEL")
    )
    arn = log_stream_arn(endpoint)
    message = (
        f'Received {side} error ({status}) from {container} with message "{original}". '
        f"See {arn} in account {ACCOUNT} for more information."
    )
    fields = {
        "ErrorCode": code,
        "OriginalStatusCode": status,
        "OriginalMessage": original,
        "LogStreamArn": arn,
    }
    # not SageMaker's, but a local client's backoff is better for knowing the container's wish
    headers = {"retry-after": retry_after} if retry_after else {}
    return AwsError(424, "ModelError", message, fields, headers)
