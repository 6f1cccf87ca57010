"""S3 for asynchronous inference: a lazily made boto3 client, AWS errors in our terms, and one
write-once prefix of results.

boto3 is imported on first use only (the `[aws]` extra), so a server that keeps its results in
a folder never pays for it. The client comes from boto3's default chain (AWS_PROFILE, env keys,
instance role; AWS_ENDPOINT_URL_S3 for MinIO or another S3-compatible store) unless one is given.

Write-once uses S3 conditional writes (`PutObject` with `If-None-Match: *`, on AWS since
August 2024): the first writer gets 200, every later one 412 PreconditionFailed, and a write
racing another still in flight 409 ConditionalRequestConflict, which we retry and then settle
by reading. A store that does not implement the header (501 NotImplemented; some S3-compatible
servers) falls back to HEAD-then-PUT, which is write-once only without concurrent writers.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twinserve.errors import NotFoundError, ServerError, TwinserveError, ValidationError

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_DENIED = frozenset(
    {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)
_EXISTS = frozenset({"PreconditionFailed", "412"})
_IN_FLIGHT = frozenset({"ConditionalRequestConflict", "409"})
_UNSUPPORTED = frozenset({"NotImplemented", "501"})
_CONFLICT_RETRIES = 4

_client_lock = threading.Lock()
_default_client: Any = None


def s3_client(client: Any = None) -> Any:
    """`client` if given, else one boto3 S3 client per process (boto3 clients are thread-safe,
    sessions are not, so the client is made once under a lock)."""
    global _default_client
    if client is not None:
        return client
    with _client_lock:
        if _default_client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise ValidationError("s3:// locations need boto3: pip install 'twinserve[aws]'") from exc
            config = Config(retries={"mode": "standard", "max_attempts": 5}, user_agent_extra="twinserve")
            _default_client = boto3.client("s3", config=config)
        return _default_client


def reset_default_client() -> None:
    """Forget the process's client (tests switch moto on and off; credentials may rotate)."""
    global _default_client
    with _client_lock:
        _default_client = None


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore `ClientError` (None for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


def translate(
    exc: Exception, what: str, *, caller_fault: bool = False, reading: bool = True
) -> TwinserveError:
    """An AWS failure of `what` ("reading s3://b/k") as one of our errors.

    A missing object or bucket is NotFoundError when reading, but a ServerError when writing (the
    results bucket is the operator's configuration, not the request's). A refused permission is
    the caller's fault when the caller named the location (`caller_fault`, an input location:
    422), ours otherwise (500). The message keeps AWS's code, never credentials.
    """
    code = error_code(exc)
    if code in _NOT_FOUND:
        message = f"{what}: no such object or bucket"
        return NotFoundError(message) if reading else ServerError(message)
    if code in _DENIED:
        message = f"{what}: access denied ({code})"
        return ValidationError(message) if caller_fault else ServerError(message)
    detail = code or type(exc).__name__
    return ServerError(f"{what} failed: {detail}")


class S3Objects:
    """The objects directly under one `s3://bucket/prefix`, each written once."""

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.base = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client
        self._conditional = True  # False once the store answered 501 to If-None-Match

    @property
    def client(self) -> Any:
        return s3_client(self._client)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def key_of(self, location: str) -> str | None:
        """The key of `location` when it names an object directly under this prefix, else None."""
        head = self.base + "/"
        if not location.startswith(head):
            return None
        name = location[len(head) :]
        if not name or "/" in name or name.startswith("."):
            return None
        return f"{self.prefix}/{name}" if self.prefix else name

    def put_once(self, name: str, body: bytes, content_type: str | None) -> str:
        """Write `name` unless it exists; the first write wins, a later one changes nothing."""
        location = self.url(name)
        key = self.key_of(location)
        assert key is not None  # names are checked by the caller
        extra = {"ContentType": content_type} if content_type else {}
        for attempt in range(_CONFLICT_RETRIES + 1):
            try:
                if self._conditional:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **extra)
                elif not self._exists_key(key, location):
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
                return location
            except TwinserveError:
                raise
            except Exception as exc:
                code = error_code(exc)
                if code in _EXISTS:
                    return location
                if code in _UNSUPPORTED and self._conditional:
                    self._conditional = False  # this store ignores conditional writes: HEAD then PUT
                    continue
                if code in _IN_FLIGHT and attempt < _CONFLICT_RETRIES:
                    time.sleep(0.05 * 2**attempt)  # another writer's PUT is in flight; it will win
                    continue
                if code in _IN_FLIGHT and self._exists_key(key, location):
                    return location
                raise translate(exc, f"writing {location}", reading=False) from exc
        raise ServerError(f"writing {location} failed: the store kept answering conflicts")

    def read(self, location: str) -> bytes:
        key = self.key_of(location)
        assert key is not None
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=key)
            return bytes(reply["Body"].read())
        except Exception as exc:
            raise translate(exc, f"reading {location}") from exc

    def exists(self, location: str) -> bool:
        key = self.key_of(location)
        assert key is not None
        return self._exists_key(key, location)

    def _exists_key(self, key: str, location: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except Exception as exc:
            if error_code(exc) in {"NoSuchKey", "NotFound", "404"}:
                return False
            raise translate(exc, f"checking {location}") from exc

    def delete_all(self, suffixes: tuple[str, ...]) -> int:
        """Delete the objects directly under the prefix that end with `suffixes` (ours only)."""
        if not self.prefix:
            raise ValidationError(f"refusing to empty the root of bucket {self.bucket}; give a prefix")
        deleted = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + "/", Delimiter="/"
            )
            for page in pages:
                keys = [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(suffixes)]
                for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys at most
                    batch = [{"Key": k} for k in keys[start : start + 1000]]
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                    deleted += len(batch)
        except Exception as exc:
            raise translate(exc, f"deleting under {self.base}", reading=False) from exc
        return deleted
