"""InvokeEndpointAsync, relayed to an async endpoint's job service through its router.

`POST /endpoints/{name}/async-invocations` carries the request in SageMaker's headers
(botocore's model of `sagemaker-runtime`); the job service's `POST /async-invocations` wants
it in ours. This module is the translation both ways, kept out of `app.py` so that the
real-time path stays one concept:

| SageMaker (request header, or the body)   | job service                          |
|-------------------------------------------|--------------------------------------|
| `X-Amzn-SageMaker-InputLocation`          | `X-Input-Location`                   |
| the inline `Body` (≤ 128,000 bytes)       | the body                             |
| `X-Amzn-SageMaker-Content-Type` / `-Accept` | `Content-Type` / `Accept`          |
| `X-Amzn-SageMaker-Inference-Id`           | `X-Inference-Id`                     |
| `X-Amzn-SageMaker-RequestTTLSeconds`      | `X-Request-TTL-Seconds`              |
| `X-Amzn-SageMaker-InvocationTimeoutSeconds` | `X-Invocation-Timeout-Seconds`     |
| `X-Amzn-SageMaker-Custom-Attributes`      | the same header, passed on           |

The 202 goes back in SageMaker's shape: `{"InferenceId": …}` in the body, the two locations in
`X-Amzn-SageMaker-OutputLocation` / `X-Amzn-SageMaker-FailureLocation`. SageMaker checks the
header values before it queues anything, so this does too (botocore checks only minimums):
a bad value is a ValidationError here, not a job that fails later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from twinserve.deploy.spec import Endpoint
from twinserve.platforms.local.gateway import errors
from twinserve.platforms.local.gateway.errors import AwsError

# InvokeEndpointAsync's limit on an inline Body (botocore's model: max 128000); the job service
# would take 6 MB, but code that works here must also work on SageMaker
ASYNC_INLINE_LIMIT = 128_000
# (header, SageMaker's name, job service header, smallest, largest): SageMaker's bounds
_LIMITS = (
    ("x-amzn-sagemaker-requestttlseconds", "RequestTTLSeconds", "x-request-ttl-seconds", 60, 21600),
    (
        "x-amzn-sagemaker-invocationtimeoutseconds",
        "InvocationTimeoutSeconds",
        "x-invocation-timeout-seconds",
        1,
        3600,
    ),
)
# output placement the local results store does not do: refused rather than silently ignored,
# since the caller would look for the answer where it asked it to be
_UNSUPPORTED = {
    "x-amzn-sagemaker-s3outputpathextension": "S3OutputPathExtension",
    "x-amzn-sagemaker-filename": "Filename",
}
_INFERENCE_ID_MAX = 64  # SageMaker's limit (the job service allows only A-Za-z0-9._- besides)


def check_async(endpoint: Endpoint) -> None:
    """A real-time endpoint has no queue: SageMaker's ValidationError, saying how to get one."""
    if endpoint.config.async_inference is None:
        raise errors.validation(
            f"Endpoint {endpoint.name} of account {errors.ACCOUNT} is not an asynchronous endpoint: "
            "create it with `twinserve endpoint create --async` (or an `async:` block) to use "
            "InvokeEndpointAsync, or call InvokeEndpoint."
        )


def job_headers(headers: Mapping[str, str], body: bytes, key: str | None, request_id: str) -> dict[str, str]:
    """The job service's request headers for SageMaker's (lower-case names); AwsError if refused."""
    for name, field in _UNSUPPORTED.items():
        if name in headers:
            raise errors.validation(f"{field} is not supported by local endpoints; leave it out.")
    location = headers.get("x-amzn-sagemaker-inputlocation")
    if (location is None) == (not body):
        raise errors.validation("Provide exactly one of InputLocation and Body.")
    out = {
        "content-type": headers.get("x-amzn-sagemaker-content-type") or errors.JSON,
        "accept": headers.get("x-amzn-sagemaker-accept") or errors.JSON,
        "x-request-id": request_id,
    }
    if location is not None:
        out["x-input-location"] = location
    inference_id = headers.get("x-amzn-sagemaker-inference-id")
    if inference_id is not None:
        if not 1 <= len(inference_id) <= _INFERENCE_ID_MAX:
            raise errors.validation(f"InferenceId must be 1 to {_INFERENCE_ID_MAX} characters long.")
        out["x-inference-id"] = inference_id
    for name, field, ours, low, high in _LIMITS:
        value = headers.get(name)
        if value is None:
            continue
        if not value.isdigit() or not low <= int(value) <= high:
            raise errors.validation(f"{field} must be an integer from {low} to {high}, not {value!r}.")
        out[ours] = value
    attributes = headers.get("x-amzn-sagemaker-custom-attributes")
    if attributes is not None:
        out["x-amzn-sagemaker-custom-attributes"] = attributes
    if key is not None:
        out["authorization"] = f"Bearer {key}"
    return out


def accepted(response: httpx.Response, name: str, request_id: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """SageMaker's 202 (headers, body) for the job service's 202; AwsError for its refusals."""
    if response.status_code != 202:
        raise _refusal(response, name)
    try:
        job = response.json()
        inference_id = str(job["inference_id"])
    except (ValueError, KeyError, TypeError):
        raise errors.internal_failure(
            f"the job service of endpoint {name} answered 202 without an inference_id"
        ) from None
    body = json.dumps({"InferenceId": inference_id}).encode()
    out = [
        (b"content-type", errors.JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"x-amzn-requestid", response.headers.get("x-request-id", request_id).encode("latin-1")),
    ]
    for field, header in (
        ("output_location", b"x-amzn-sagemaker-outputlocation"),
        ("failure_location", b"x-amzn-sagemaker-failurelocation"),
    ):
        if job.get(field):
            out.append((header, str(job[field]).encode("latin-1")))
    return out, body


def _refusal(response: httpx.Response, name: str) -> AwsError:
    """The job service's (or its router's) error answer as SageMaker's: InvokeEndpointAsync
    models only ValidationError, ServiceUnavailable and InternalFailure."""
    status, message = response.status_code, _message(response)
    if status == 413:
        return errors.validation(message, 413)
    if status in (401, 403):
        # the gateway sent the key the store holds: the router disagrees with the store
        return errors.access_denied("AccessDeniedException", message)
    if status == 429:
        return AwsError(429, "ThrottlingException", message, headers=_retry(response))
    if status == 503:
        failure = errors.service_unavailable(f"Endpoint {name} cannot queue requests now: {message}")
        failure.headers.update(_retry(response))
        return failure
    if 400 <= status < 500:
        return errors.validation(message)
    return errors.internal_failure(f"the job service of endpoint {name} failed ({status}): {message}")


def _message(response: httpx.Response) -> str:
    """The message of a TGI-shaped (`{"error": str}`), OpenAI-shaped or plain-text error body."""
    text = response.content.decode("utf-8", errors="replace").strip()
    try:
        payload: Any = json.loads(text)
    except ValueError:
        return text[: errors.ORIGINAL_MESSAGE_LIMIT] or f"HTTP {response.status_code}"
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(error, dict):
            error = error.get("message")
        if error:
            return str(error)
    return text[: errors.ORIGINAL_MESSAGE_LIMIT]


def _retry(response: httpx.Response) -> dict[str, str]:
    value = response.headers.get("retry-after")
    return {"retry-after": value} if value else {}
