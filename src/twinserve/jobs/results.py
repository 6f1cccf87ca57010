"""Where asynchronous inference leaves its answers: a folder or an S3 prefix, written once per id.

`open_results("file:///srv/twin/results")` (or a plain path) and
`open_results("s3://bucket/prefix", failure_location="s3://bucket/errors")` give a
`ResultStore`. A success is `<base>/<inference_id>.out`, a failure `<failure
base>/<inference_id>.error`; without a failure location failures go to `<base>/failures/`
(SageMaker's S3OutputPath and S3FailurePath). `location_for` says where an answer *will* be,
so the submit call can return OutputLocation / FailureLocation before the job runs.

Every put is write-once — the first write wins and a later put of the same id returns the
same location without touching the object — because a job may run twice (a worker dies after
writing, before acking, and the queue redelivers) and a client may already have read the
first answer. Files: the body goes to a temporary file, is fsynced, then `os.link`ed to its
name, which fails if the name exists, so a reader never sees half an answer and racing writers
leave one. Where hard links are not supported (FAT, some network shares) a lock (a thread lock
plus `flock` on `.lock`) guards an exists check and `os.replace`. S3: see `twinserve.jobs.s3`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from twinserve.errors import NotFoundError, ServerError, ValidationError
from twinserve.jobs.locations import file_path, parse_s3, read_input
from twinserve.jobs.s3 import S3Objects

__all__ = ["ResultStore", "check_inference_id", "open_results", "read_input"]

SUCCESS_SUFFIX = ".out"
FAILURE_SUFFIX = ".error"
FAILURES_FOLDER = "failures"
# ids become file names and S3 keys: no separators, no leading dot, nothing to escape; 200 at
# most so that `.<id>.error.<random>.tmp` stays under the 255 bytes a file name may have
INFERENCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# link() errors that mean "this file system has no hard links", not "you may not"
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})


def check_inference_id(inference_id: str) -> str:
    """`inference_id` if it can name a result (1-200 of `A-Za-z0-9._-`, not starting with `.`, `_` or `-`)."""
    if not INFERENCE_ID.fullmatch(inference_id):
        raise ValidationError(
            f"an inference id is 1-200 letters, digits, '.', '_' or '-', starting with a letter or digit;"
            f" got {inference_id[:200]!r}",
            param="inference_id",
        )
    return inference_id


@runtime_checkable
class ResultStore(Protocol):
    """The answers of asynchronous requests, one write-once object per inference id and outcome."""

    def location_for(self, inference_id: str, failed: bool = False) -> str:
        """Where the answer (or failure) of `inference_id` is or will be; nothing is written."""
        ...

    def put_success(self, inference_id: str, body: bytes, content_type: str | None = None) -> str:
        """Store the answer once; the location (the existing one if it was already stored)."""
        ...

    def put_failure(
        self, inference_id: str, body: bytes, content_type: str | None = "application/json"
    ) -> str:
        """Store the failure once; the location (the existing one if it was already stored)."""
        ...

    def get(self, location: str) -> bytes:
        """The stored bytes; NotFoundError if nothing is there, ValidationError if not ours."""
        ...

    def exists(self, location: str) -> bool:
        """Whether something is stored at `location` (a location of this store)."""
        ...

    def delete_prefix(self) -> int:
        """Delete every result and failure of this store; how many objects went."""
        ...


class _Objects(Protocol):
    """The objects directly under one base (a folder, an S3 prefix)."""

    base: str

    def url(self, name: str) -> str: ...
    def key_of(self, location: str) -> str | None: ...
    def put_once(self, name: str, body: bytes, content_type: str | None) -> str: ...
    def read(self, location: str) -> bytes: ...
    def exists(self, location: str) -> bool: ...
    def delete_all(self, suffixes: tuple[str, ...]) -> int: ...


class Results:
    """A `ResultStore` over a success base and a failure base (of any scheme each)."""

    def __init__(self, success: _Objects, failure: _Objects) -> None:
        self.success = success
        self.failure = failure

    def __repr__(self) -> str:
        return f"Results(success={self.success.base!r}, failure={self.failure.base!r})"

    def location_for(self, inference_id: str, failed: bool = False) -> str:
        check_inference_id(inference_id)
        if failed:
            return self.failure.url(inference_id + FAILURE_SUFFIX)
        return self.success.url(inference_id + SUCCESS_SUFFIX)

    def put_success(self, inference_id: str, body: bytes, content_type: str | None = None) -> str:
        check_inference_id(inference_id)
        return self.success.put_once(inference_id + SUCCESS_SUFFIX, body, content_type)

    def put_failure(
        self, inference_id: str, body: bytes, content_type: str | None = "application/json"
    ) -> str:
        check_inference_id(inference_id)
        return self.failure.put_once(inference_id + FAILURE_SUFFIX, body, content_type)

    def _owner(self, location: str) -> _Objects:
        # the failure base first: by default it is nested under the success base
        for objects in (self.failure, self.success):
            if objects.key_of(location) is not None:
                return objects
        raise ValidationError(f"{location[:300]!r} is not a location of this result store", param="location")

    def get(self, location: str) -> bytes:
        return self._owner(location).read(location)

    def exists(self, location: str) -> bool:
        return self._owner(location).exists(location)

    def delete_prefix(self) -> int:
        deleted = self.success.delete_all((SUCCESS_SUFFIX, FAILURE_SUFFIX))
        if self.failure.base != self.success.base:
            deleted += self.failure.delete_all((SUCCESS_SUFFIX, FAILURE_SUFFIX))
        return deleted


class FileObjects:
    """The files directly in one folder, each written once (the folder is made on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.base = self.root.as_uri()
        self._lock = threading.Lock()

    def url(self, name: str) -> str:
        return (self.root / name).as_uri()

    def key_of(self, location: str) -> str | None:
        head = self.base.rstrip("/") + "/"
        if not location.startswith(head):
            return None
        name = location[len(head) :]
        if not name or "/" in name or "%" in name or name.startswith("."):
            return None
        return name

    def _path(self, location: str) -> Path:
        name = self.key_of(location)
        assert name is not None
        return self.root / name

    def put_once(self, name: str, body: bytes, content_type: str | None) -> str:
        # content_type is S3 metadata; a folder keeps bytes only (the job record has the type)
        final = self.root / name
        if final.exists():
            return final.as_uri()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                self._publish(Path(tmp), final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as exc:
            raise ServerError(f"writing {final.as_uri()} failed: {exc.strerror or exc}") from exc
        return final.as_uri()

    def _publish(self, tmp: Path, final: Path) -> None:
        """Give the complete temporary file its name unless the name exists already."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            return  # another writer was first; its answer stays
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            with self._lock, _flock(self.root / ".lock"):
                if final.exists():
                    return
                os.replace(tmp, final)
        _fsync_dir(self.root)

    def read(self, location: str) -> bytes:
        path = self._path(location)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"no result at {location}") from exc
        except OSError as exc:
            raise ServerError(f"reading {location} failed: {exc.strerror or exc}") from exc

    def exists(self, location: str) -> bool:
        return self._path(location).is_file()

    def delete_all(self, suffixes: tuple[str, ...]) -> int:
        if not self.root.is_dir():
            return 0
        deleted = 0
        for path in self.root.iterdir():
            if path.is_file() and not path.name.startswith(".") and path.name.endswith(suffixes):
                path.unlink(missing_ok=True)
                deleted += 1
        return deleted


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (POSIX `flock`; threads are the caller's lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows has hard links on NTFS, so rarely here
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_dir(folder: Path) -> None:
    """Make the new name durable too (a crash after link() could otherwise lose the entry)."""
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _objects(location: str, client: Any) -> _Objects:
    if location.startswith("s3://"):
        bucket, prefix = parse_s3(location, param="location")
        return S3Objects(bucket, prefix, client)
    if location.startswith("file:"):
        return FileObjects(file_path(location, param="location"))
    if "://" in location:
        raise ValidationError(f"a results location is file://, s3:// or a path, not {location!r}")
    return FileObjects(Path(location))


def open_results(location: str, *, failure_location: str | None = None, s3_client: Any = None) -> ResultStore:
    """The result store at `location` (`file:///abs/dir`, a path, or `s3://bucket/prefix`).

    Failures go to `failure_location` if given (SageMaker's S3FailurePath), else to
    `<location>/failures`. `s3_client` is a boto3 S3 client (default: one from boto3's chain).
    """
    success = _objects(location, s3_client)
    if failure_location is None:
        failure = _objects(f"{success.base.rstrip('/')}/{FAILURES_FOLDER}", s3_client)
    else:
        failure = _objects(failure_location, s3_client)
    return Results(success, failure)
