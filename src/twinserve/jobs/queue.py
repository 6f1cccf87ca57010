"""The durable job queue of asynchronous inference, behind one `JobQueue` protocol.

Two backends keep the same contract (one test suite runs against both):
- SQLite (`queue_sqlite.py`), the default: one file under the state folder, shared by the
  processes of one machine (the gateway that submits, the workers on the replicas).
- Redis Streams (`queue_redis.py`), `TWINSERVE_QUEUE_URL=redis://…`: for workers on several hosts.

The contract, in SQS terms: delivery is *at least once*. A worker leases jobs for a visibility
timeout and extends the lease with heartbeats while it works; a lease that runs out (the worker
died or stalled) makes the job deliverable again, to anyone. So a job may run twice, and
`complete` settles it: the first completion wins and every later one is a no-op that returns
False, so a job never has two visible results. A failed attempt is retried until `max_attempts`
deliveries, and a job no worker started within its TTL expires instead of running late.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from twinserve.errors import ConflictError, ValidationError
from twinserve.jobs.model import MAX_INLINE_BODY_BYTES, Job, JobStatus, Lease

Clock = Callable[[], datetime]
"""Where a queue reads the time (aware UTC datetimes); tests pass a fake one."""

QUEUE_URL_ENV = "TWINSERVE_QUEUE_URL"
# The longest a lease may run without a heartbeat. Redis needs a bound (see queue_redis);
# both backends refuse the same values so that code moves between them unchanged.
MAX_VISIBILITY_TIMEOUT_S = 24 * 3600.0
MAX_LEASE_BATCH = 1000
MAX_LIST_LIMIT = 10_000


class LeaseLostError(ConflictError):
    """The lease is no longer this worker's: it expired and the job went to another worker, or
    the job was finished (by a redelivered copy) or purged. Stop working on it; its result, if
    any, would not count."""

    error_type = "lease_lost"


@runtime_checkable
class JobQueue(Protocol):
    """A durable FIFO of jobs per endpoint with leases, retries, TTL and first-completion-wins."""

    def submit(self, job: Job) -> Job:
        """Queue `job`; idempotent by inference_id: a second submit returns the stored job unchanged."""
        ...

    def lease(
        self,
        endpoint: str,
        worker: str,
        *,
        visibility_timeout_s: float,
        limit: int = 1,
        now: datetime | None = None,
    ) -> builtins.list[Lease]:
        """Up to `limit` jobs of `endpoint` for `worker`, oldest first: expired leases are
        redelivered, then queued jobs. A queued job past its TTL becomes `expired` instead."""
        ...

    def heartbeat(self, lease: Lease, extend_s: float) -> Lease:
        """Keep holding the job `extend_s` seconds from now; LeaseLostError if it is not ours now."""
        ...

    def complete(self, lease: Lease, output_location: str) -> bool:
        """Mark the job succeeded with its result; False (and no change) if it was already final."""
        ...

    def fail(
        self, lease: Lease, reason: str, *, retry: bool = True, failure_location: str | None = None
    ) -> Job:
        """Record a failed attempt: queued again (to the back) while attempts remain and `retry`,
        else `failed` with `reason` (and `failure_location`, where the error body is). A job
        already final is returned unchanged; LeaseLostError if another delivery holds it."""
        ...

    def get(self, inference_id: str) -> Job:
        """The job; NotFoundError if it was never submitted, or was purged."""
        ...

    def list(self, endpoint: str, *, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        """Jobs of `endpoint`, newest first, optionally of one status."""
        ...

    def depth(self, endpoint: str) -> int:
        """The backlog: queued plus running jobs (what async autoscaling scales on)."""
        ...

    def counts(self, endpoint: str) -> dict[JobStatus, int]:
        """Number of jobs in each status (every status present, zero included)."""
        ...

    def purge(self, endpoint: str) -> None:
        """Forget every job of `endpoint` (it is being deleted); its leases are lost."""
        ...

    def close(self) -> None:
        """Release connections; the queue's data stays."""
        ...


def check_submittable(job: Job) -> None:
    """Refuse what no backend should store: an inline body over SageMaker's async limit, or a
    job that claims progress (a submit is always of a fresh, queued job)."""
    if job.body is not None and len(job.body) > MAX_INLINE_BODY_BYTES:
        raise ValidationError(
            f"inline body of {len(job.body)} bytes is over the {MAX_INLINE_BODY_BYTES}-byte limit; "
            "send larger inputs by input_location",
            param="body",
        )
    if job.status is not JobStatus.QUEUED or job.attempts:
        raise ValidationError("a submitted job must be queued with no attempts", param="status")


def check_lease_args(visibility_timeout_s: float, limit: int = 1) -> None:
    if not 0 < visibility_timeout_s <= MAX_VISIBILITY_TIMEOUT_S:
        raise ValidationError(
            f"visibility timeout must be in (0, {MAX_VISIBILITY_TIMEOUT_S:.0f}] seconds, "
            f"not {visibility_timeout_s}",
            param="visibility_timeout_s",
        )
    check_limit(limit, MAX_LEASE_BATCH)


def check_limit(limit: int, most: int) -> None:
    if not 1 <= limit <= most:
        raise ValidationError(f"limit must be in [1, {most}], not {limit}", param="limit")


def sqlite_url(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'queue.db'}"


def open_queue(url: str | None, *, state_dir: Path, clock: Clock | None = None) -> JobQueue:
    """The queue at `url`, else at `TWINSERVE_QUEUE_URL`, else `sqlite:///STATE_DIR/queue.db`.

    `sqlite:///PATH` (SQLAlchemy's form: four slashes for an absolute path) or `redis://…`,
    `rediss://…`, `unix://…` (redis-py's forms). The
    backends are imported here, so Redis's client is needed only by those who use it.
    """
    url = url or os.environ.get(QUEUE_URL_ENV) or sqlite_url(state_dir)
    if url.startswith("sqlite:///"):
        from twinserve.jobs.queue_sqlite import SqliteJobQueue

        return SqliteJobQueue(Path(url.removeprefix("sqlite:///")), clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from twinserve.jobs.queue_redis import RedisJobQueue

        return RedisJobQueue(url, clock=clock)
    raise ValidationError(
        f"unknown job queue URL {url!r}: use sqlite:///PATH or redis://HOST:PORT/DB", param=QUEUE_URL_ENV
    )
