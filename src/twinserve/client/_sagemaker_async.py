"""SageMaker's asynchronous invocations in the job service's terms, for `SageMakerTransport`.

`InvokeEndpointAsync` takes the input inline (`Body`, at most 128,000 bytes, in botocore's
recent models) or as an S3 `InputLocation`; with an `async_input_location` prefix the body is
uploaded there first, one new object per call, so any size and any botocore works. SageMaker has
no status API: a job is done when its answer is at `OutputLocation`, or its error body at
`FailureLocation`, so status is a HEAD of those two objects and the output a GET. Until then
the job is `pending` (queued or running: SageMaker does not say which).

`file://` locations are read from this machine's disk: the local gateway's job service writes
its results to a folder by default, and it only listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from twinserve.client.transport import AsyncRef, AsyncRequest, Response
from twinserve.errors import UnauthorizedError, ValidationError

_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True)
class Found:
    """A final job's object: `failed` tells which of the two it is."""

    location: str
    failed: bool
    modified: datetime | None


def s3_parts(location: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`; ValidationError for anything else."""
    parsed = urlparse(location)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValidationError(f"not an s3://bucket/key location: {location!r}")
    return parsed.netloc, parsed.path.lstrip("/")


class SageMakerJobs:
    """Uploads inputs and looks for results; `s3` makes the S3 client on first use."""

    def __init__(self, input_prefix: str | None, s3: Any) -> None:
        if input_prefix is not None:
            s3_parts(input_prefix)  # refuse a bad prefix when the transport is made
            input_prefix = input_prefix.rstrip("/")
        self.input_prefix = input_prefix
        self._s3 = s3

    def invoke_args(self, request: AsyncRequest, *, inline_body: bool) -> dict[str, Any]:
        """InvokeEndpointAsync's arguments but EndpointName; uploads the body if it must.
        `inline_body`: botocore's model has the inline `Body` (older ones do not)."""
        args: dict[str, Any] = {"ContentType": request.content_type, "Accept": request.accept}
        for name, value in (
            ("InferenceId", request.inference_id),
            ("RequestTTLSeconds", request.request_ttl_s),
            ("InvocationTimeoutSeconds", request.invocation_timeout_s),
        ):
            if value is not None:
                args[name] = value
        if request.input_location is not None:
            args["InputLocation"] = request.input_location
        elif self.input_prefix is not None:
            args["InputLocation"] = self._upload(request)
        elif inline_body:
            args["Body"] = request.body
        else:
            raise ValidationError(
                "this botocore has no inline Body for InvokeEndpointAsync: give the transport "
                "async_input_location='s3://bucket/prefix' (the body is uploaded there), or upgrade boto3"
            )
        return args

    def _upload(self, request: AsyncRequest) -> str:
        assert self.input_prefix is not None and request.body is not None
        bucket, prefix = s3_parts(self.input_prefix)
        name = f"{request.inference_id}-{uuid.uuid4().hex}" if request.inference_id else uuid.uuid4().hex
        key = f"{prefix}/{name}.in" if prefix else f"{name}.in"
        self._s3().put_object(Bucket=bucket, Key=key, Body=request.body, ContentType=request.content_type)
        return f"s3://{bucket}/{key}"

    def find(self, ref: AsyncRef) -> Found | None:
        """The answer's object, else the error body's, else None (not final yet)."""
        for location, failed in ((ref.output_location, False), (ref.failure_location, True)):
            if location is None:
                continue
            exists, modified = self._head(location)
            if exists:
                return Found(location, failed, modified)
        return None

    def _head(self, location: str) -> tuple[bool, datetime | None]:
        """Whether the object is there (yet), and when it was written."""
        if location.startswith("file://"):
            path = _file_path(location)
            if not path.is_file():
                return False, None
            return True, datetime.fromtimestamp(path.stat().st_mtime).astimezone()
        bucket, key = s3_parts(location)
        try:
            head = self._s3().head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # botocore's ClientError: only "no such object" means "not yet"
            if _code(exc) in _MISSING:
                return False, None
            if _code(exc) in ("403", "AccessDenied"):
                raise UnauthorizedError(
                    f"S3 refused HEAD {location}: reading async results needs s3:GetObject, and "
                    "s3:ListBucket on the bucket (without it S3 says 403, not 404, for an object "
                    "not written yet)"
                ) from exc
            raise
        modified = head.get("LastModified")
        return True, modified if isinstance(modified, datetime) else None

    def read(self, found: Found) -> Response:
        """The object as the job service's `/output` would answer it."""
        if found.location.startswith("file://"):
            body, content_type = _file_path(found.location).read_bytes(), "application/json"
        else:
            bucket, key = s3_parts(found.location)
            out = self._s3().get_object(Bucket=bucket, Key=key)
            body, content_type = out["Body"].read(), out.get("ContentType") or "application/json"
        headers = {"content-type": content_type}
        if found.failed:
            headers["x-job-status"] = "failed"
        return Response(200, headers, body)


def accepted(out: dict[str, Any]) -> Response:
    """InvokeEndpointAsync's answer as the job service's 202."""
    body = {
        "inference_id": out["InferenceId"],
        "status": "queued",
        "output_location": out.get("OutputLocation"),
        "failure_location": out.get("FailureLocation"),
    }
    return Response(202, {"content-type": "application/json"}, json.dumps(body).encode())


def status(ref: AsyncRef, found: Found | None) -> Response:
    """The job service's status JSON, from what is (or is not yet) at the locations."""
    if ref.output_location is None and ref.failure_location is None:
        error = {"error": f"no location to look for {ref.inference_id} at", "error_type": "not_found"}
        return Response(404, {}, json.dumps(error).encode())
    state = "pending" if found is None else ("failed" if found.failed else "succeeded")
    body = {
        "inference_id": ref.inference_id,
        "status": state,
        "output_location": ref.output_location,
        "failure_location": ref.failure_location,
        "finished_at": found.modified.isoformat() if found and found.modified else None,
    }
    return Response(200, {"content-type": "application/json"}, json.dumps(body).encode())


def not_finished(ref: AsyncRef) -> Response:
    error = {"error": f"async inference {ref.inference_id} has not finished", "error_type": "conflict"}
    return Response(409, {}, json.dumps(error).encode())


def _file_path(location: str) -> Path:
    return Path(unquote(urlparse(location).path))


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    return str(error.get("Code", ""))
