"""Locations of asynchronous inference (`file://`, `s3://`), and reading a request's input location.

An asynchronous request may name its payload instead of carrying it (`X-Input-Location`, as
SageMaker's `InputLocation`). That location comes from the caller, so reading it is guarded:
- `file://` URLs must be absolute, free of `..`, and — after every symlink is resolved — inside
  one of the folders the operator allowed (none allowed means `file://` inputs are off). The
  final open refuses a symlink (`O_NOFOLLOW`), so swapping one in after the check fails too,
  and anything but a regular file (a folder, a FIFO, a device) is refused. POSIX only.
- `s3://` objects are read with the server's credentials, optionally only from allowed buckets.
- Nothing above `limit_bytes` is read into memory: the size is checked before the read, and
  the read stops one byte past the limit in case the object grew meanwhile.
Errors: ValidationError (422) for a malformed or refused location, NotFoundError (404) for a
missing object, PayloadTooLargeError (413) above the limit.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from twinserve.errors import NotFoundError, PayloadTooLargeError, ServerError, TwinserveError, ValidationError
from twinserve.jobs.s3 import s3_client, translate

# S3's bucket naming rules (lowercase, digits, dots, hyphens; 3-63 characters)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PARAM = "input_location"


def parse_s3(location: str, *, param: str | None = None) -> tuple[str, str]:
    """`s3://bucket/key/parts` as (bucket, key); the key may be empty (a bucket or prefix root).

    Split by hand rather than with urlsplit: an S3 key may hold `?` and `#`, which are not
    query or fragment here.
    """
    if not location.startswith("s3://"):
        raise ValidationError(f"not an s3:// URL: {location!r}", param=param)
    bucket, _, key = location[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValidationError(f"not a valid S3 bucket name in {location!r}", param=param)
    return bucket, key


def file_path(location: str, *, param: str | None = None) -> Path:
    """The absolute path of a `file:///abs/path` URL (percent-escapes decoded), not yet resolved."""
    parts = urlsplit(location)
    if parts.scheme != "file":
        raise ValidationError(f"not a file:// URL: {location!r}", param=param)
    if parts.netloc not in ("", "localhost"):
        raise ValidationError(f"file:// URLs name this machine only, not {parts.netloc!r}", param=param)
    if parts.query or parts.fragment:
        raise ValidationError(f"a file:// URL takes no query or fragment: {location!r}", param=param)
    path = unquote(parts.path)
    if "\x00" in path or not path.startswith("/"):
        raise ValidationError(f"a file:// URL needs an absolute path (file:///…): {location!r}", param=param)
    return Path(path)


def read_input(
    location: str,
    *,
    limit_bytes: int,
    allowed_roots: Iterable[str | os.PathLike[str]] = (),
    allowed_buckets: Collection[str] | None = None,
    client: Any = None,
) -> bytes:
    """The bytes at an input location (`file:///abs/path` or `s3://bucket/key`).

    `allowed_roots` are the folders `file://` inputs may come from (none: `file://` refused);
    `allowed_buckets` restricts `s3://` inputs (None: any bucket the credentials can read);
    `client` is a boto3 S3 client (default: the process's, from boto3's default chain).
    """
    if limit_bytes < 0:
        raise ValueError("limit_bytes must be >= 0")
    if location.startswith("s3://"):
        return _read_s3(location, limit_bytes, allowed_buckets, client)
    if location.startswith("file:"):
        return _read_file(location, limit_bytes, [Path(r) for r in allowed_roots])
    raise ValidationError(
        f"an input location is an s3://bucket/key or file:///abs/path URL, not {location[:200]!r}",
        param=_PARAM,
    )


def _too_large(location: str, size: int | None, limit: int) -> PayloadTooLargeError:
    known = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return PayloadTooLargeError(f"the input at {location} is {known}, over the limit of {limit} bytes")


def _read_file(location: str, limit: int, roots: list[Path]) -> bytes:
    path = file_path(location, param=_PARAM)
    if ".." in path.parts:
        raise ValidationError(f"an input location must not contain '..': {location!r}", param=_PARAM)
    if not roots:
        raise ValidationError("file:// input locations are not enabled on this server", param=_PARAM)
    try:
        resolved = path.resolve()
        inside = any(resolved.is_relative_to(root.resolve()) for root in roots)
    except (OSError, RuntimeError) as exc:  # a symlink loop, an unreadable parent
        raise ValidationError(f"cannot resolve the input location {location!r}", param=_PARAM) from exc
    if not inside:
        # the same answer whether or not the file exists: nothing leaks about the rest of the disk
        raise ValidationError(
            f"{location!r} is outside the folders this server reads inputs from", param=_PARAM
        )
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (regular files
    # ignore the flag); the fstat below then refuses the FIFO
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError as exc:
        raise NotFoundError(f"no input at {location}") from exc
    except OSError as exc:  # permission, a symlink swapped in after the check (ELOOP)
        raise ValidationError(f"cannot read the input at {location}: {exc.strerror}", param=_PARAM) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO (which would block), a device
        os.close(fd)
        raise ValidationError(f"the input at {location} is not a regular file", param=_PARAM)
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise _too_large(location, info.st_size, limit)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_large(location, None, limit)
    return data


def _read_s3(location: str, limit: int, allowed_buckets: Collection[str] | None, client: Any) -> bytes:
    bucket, key = parse_s3(location, param=_PARAM)
    if not key or key.endswith("/"):
        raise ValidationError(f"an s3:// input location names an object, not {location!r}", param=_PARAM)
    if allowed_buckets is not None and bucket not in allowed_buckets:
        raise ValidationError(f"this server does not read inputs from bucket {bucket!r}", param=_PARAM)
    try:
        reply = s3_client(client).get_object(Bucket=bucket, Key=key)
    except TwinserveError:
        raise
    except Exception as exc:
        raise translate(exc, f"reading {location}", caller_fault=True) from exc
    body = reply["Body"]
    try:
        size = reply.get("ContentLength")
        if isinstance(size, int) and size > limit:
            raise _too_large(location, size, limit)
        data = bytes(body.read(limit + 1))
    except TwinserveError:
        raise
    except Exception as exc:  # the connection broke mid-body
        raise ServerError(f"reading {location} failed: {type(exc).__name__}") from exc
    finally:
        body.close()
    if len(data) > limit:
        raise _too_large(location, None, limit)
    return data
