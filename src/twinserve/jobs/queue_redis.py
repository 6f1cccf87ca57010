"""The job queue on Redis Streams (`TWINSERVE_QUEUE_URL=redis://…`), for workers on several hosts.

One stream per endpoint with one consumer group (`workers`): `XADD` queues, `XREADGROUP`
delivers new entries, the group's pending list holds the running ones until `XACK`, and
`XAUTOCLAIM` hands entries whose lease ran out to the next worker that asks (at least once).
A job's state is a hash beside the stream; every change is one Lua script
(`queue_redis_scripts`), so leasing is exclusive and the first completion wins without locks.
A retry re-adds the job to the end of its stream. Everything lives under `twinserve:jobs:`.

Lease expiry follows the Redis server's clock (the pending entries' idle time), so a fake
clock in tests moves TTLs and timestamps but not lease expiry. Runs on standalone Redis (or a
primary with replicas), not Redis Cluster: the scripts reach keys they are not given.

The client comes from the `[redis]` extra and is imported only here.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twinserve.errors import NotFoundError, ServerError, UnreachableError, ValidationError
from twinserve.jobs import queue_redis_scripts as scripts
from twinserve.jobs.model import Job, JobStatus, Lease, new_inference_id, utcnow
from twinserve.jobs.queue import (
    MAX_LIST_LIMIT,
    MAX_VISIBILITY_TIMEOUT_S,
    Clock,
    LeaseLostError,
    check_lease_args,
    check_limit,
    check_submittable,
)

PREFIX = "twinserve:jobs:"
_HORIZON_MS = int(MAX_VISIBILITY_TIMEOUT_S * 1000)
# progress fields kept as hash fields (absent = None); the rest of a job is its submit record
_OPTIONAL = ("failure_reason", "output_location", "failure_location", "started_at", "finished_at")
_PURGE_BATCH = 500


def _redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise ValidationError(
            "a redis:// job queue needs the redis client: pip install 'twinserve[redis]'",
            param="TWINSERVE_QUEUE_URL",
        ) from exc
    return redis


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisJobQueue:
    """The `JobQueue` on Redis Streams; safe across processes and hosts."""

    def __init__(
        self, url: str, *, clock: Clock | None = None, prefix: str = PREFIX, client: Any = None
    ) -> None:
        self._module = _redis()
        self.url = redact(url)
        self.prefix = prefix
        self.clock: Clock = clock or utcnow
        # bytes out (bodies are binary); health checks re-open connections a proxy dropped
        self._r = client or self._module.Redis.from_url(
            url, socket_timeout=30, socket_connect_timeout=10, health_check_interval=30
        )
        self._scripts = {
            name: self._r.register_script(getattr(scripts, name))
            for name in ("SUBMIT", "LEASE", "HEARTBEAT", "COMPLETE", "FAIL")
        }

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Redis failures as our errors: unreachable (503, worth retrying) or a server error."""
        try:
            yield
        except (self._module.ConnectionError, self._module.TimeoutError) as exc:
            raise UnreachableError(f"job queue at {self.url} unreachable: {exc}") from exc
        except self._module.RedisError as exc:
            raise ServerError(f"job queue at {self.url} failed: {exc}") from exc

    def _run(self, name: str, *args: object) -> Any:
        with self._errors():
            return self._scripts[name](keys=[], args=[self.prefix, *args])

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # --- submitting and reading ---

    def submit(self, job: Job) -> Job:
        check_submittable(job)
        added = self._run(
            "SUBMIT",
            job.inference_id,
            job.endpoint,
            json.dumps(job.to_record()),
            "0" if job.body is None else "1",
            job.body or b"",
            math.floor(job.expires_at.timestamp() * 1000),
            job.max_attempts,
            f"{job.ttl_s:g}",
        )
        return job if added else self.get(job.inference_id)

    def get(self, inference_id: str) -> Job:
        with self._errors():
            found = self._r.hgetall(self._key("job", inference_id))
        if not found:
            raise NotFoundError(f"no async inference {inference_id!r}")
        return _job(found)

    def list(self, endpoint: str, *, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        check_limit(limit, MAX_LIST_LIMIT)
        index = self._key("all", endpoint) if status is None else self._key("status", endpoint, str(status))
        with self._errors():
            ids = self._r.zrevrange(index, 0, limit - 1)
            pipe = self._r.pipeline(transaction=False)
            for inference_id in ids:
                pipe.hgetall(self._key("job", inference_id.decode()))
            found = pipe.execute()
        return [_job(h) for h in found if h]  # one purged meanwhile is skipped

    def depth(self, endpoint: str) -> int:
        return sum(n for status, n in self.counts(endpoint).items() if status.is_backlog)

    def counts(self, endpoint: str) -> dict[JobStatus, int]:
        with self._errors():
            pipe = self._r.pipeline(transaction=False)
            for status in JobStatus:
                pipe.zcard(self._key("status", endpoint, str(status)))
            return dict(zip(JobStatus, (int(n) for n in pipe.execute()), strict=True))

    def purge(self, endpoint: str) -> None:
        """Delete the endpoint's jobs in batches (a job submitted during a purge may survive it)."""
        index = self._key("all", endpoint)
        with self._errors():
            while ids := self._r.zrange(index, 0, _PURGE_BATCH - 1):
                self._r.delete(*(self._key("job", i.decode()) for i in ids))
                self._r.zrem(index, *ids)
            statuses = (self._key("status", endpoint, str(s)) for s in JobStatus)
            self._r.delete(self._key("stream", endpoint), self._key("cursor", endpoint), *statuses)

    def close(self) -> None:
        with self._errors():
            self._r.close()

    # --- leasing ---

    def lease(
        self,
        endpoint: str,
        worker: str,
        *,
        visibility_timeout_s: float,
        limit: int = 1,
        now: datetime | None = None,
    ) -> builtins.list[Lease]:
        check_lease_args(visibility_timeout_s, limit)
        now = now or self.clock()
        out = self._run(
            "LEASE",
            endpoint,
            worker,
            math.floor(now.timestamp() * 1000),
            now.isoformat(),
            _HORIZON_MS,
            _idle_ms(visibility_timeout_s),
            limit,
            *(new_inference_id() for _ in range(limit)),
        )
        expires = now + timedelta(seconds=visibility_timeout_s)
        return [
            Lease(job=_job(_pairs(h)), receipt=r.decode(), worker=worker, expires_at=expires)
            for r, h in zip(out[::2], out[1::2], strict=True)
        ]

    def heartbeat(self, lease: Lease, extend_s: float) -> Lease:
        check_lease_args(extend_s)
        found = self._run(
            "HEARTBEAT", lease.job.inference_id, lease.receipt, lease.worker, _idle_ms(extend_s)
        )
        if not found:
            raise LeaseLostError(
                f"job {lease.job.inference_id} is no longer held by this lease of {lease.worker}"
            )
        expires = self.clock() + timedelta(seconds=extend_s)
        return lease.model_copy(update={"job": _job(_pairs(found)), "expires_at": expires})

    def complete(self, lease: Lease, output_location: str) -> bool:
        return bool(self._run("COMPLETE", lease.job.inference_id, output_location, self.clock().isoformat()))

    def fail(
        self, lease: Lease, reason: str, *, retry: bool = True, failure_location: str | None = None
    ) -> Job:
        outcome, found = self._run(
            "FAIL",
            lease.job.inference_id,
            lease.receipt,
            reason,
            "1" if retry else "0",
            failure_location or "",
            self.clock().isoformat(),
        )
        if outcome == b"lost":
            raise LeaseLostError(
                f"job {lease.job.inference_id} is no longer held by this lease of {lease.worker}"
            )
        return _job(_pairs(found))


def _idle_ms(lease_s: float) -> int:
    """The idle time that makes a pending entry reclaimable `lease_s` seconds from now."""
    return _HORIZON_MS - math.ceil(lease_s * 1000)


def _pairs(flat: builtins.list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _job(fields: dict[bytes, bytes]) -> Job:
    h = {k.decode(): v for k, v in fields.items()}
    record = json.loads(h["record"])
    record.update(status=h["status"].decode(), attempts=int(h["attempts"]), body=h.get("body"))
    for name in _OPTIONAL:
        record[name] = h[name].decode() if name in h else None
    return Job.model_validate(record)
