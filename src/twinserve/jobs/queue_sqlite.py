"""The default job queue: one SQLite file (`STATE_DIR/queue.db`) shared by the processes of a
machine, the gateway that submits and the workers that lease.

Every change is one `BEGIN IMMEDIATE` transaction: the write lock is taken before the rows are
read, so two workers (threads or processes) never both see a job as free and lease it twice,
and no read-then-upgrade deadlock can happen. WAL lets readers (`get`, `list`, `depth`) go on
during a write; a busy timeout makes a second writer wait for the lock instead of failing.
`synchronous = FULL`: a job the gateway answered 202 for survives a power cut, not just a crash.

Schema (the job's JSON is the `Job` model without its body; the other columns are for queries):
```
schema_version(version)
jobs(id PK autoincrement   submission order (listing, newest first)
     inference_id UNIQUE, endpoint, status,
     queue_seq             FIFO position; a retry moves the job to the back
     start_deadline        created_at + ttl_s, epoch seconds (TTL expiry of never-started jobs)
     receipt, worker, lease_expires   the current lease of a running job
     body BLOB, record TEXT)
```
"""

from __future__ import annotations

import builtins
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from twinserve import sqlite_db
from twinserve.errors import NotFoundError, ServerError
from twinserve.jobs.model import Job, JobStatus, Lease, new_inference_id, utcnow
from twinserve.jobs.queue import (
    MAX_LIST_LIMIT,
    Clock,
    LeaseLostError,
    check_lease_args,
    check_limit,
    check_submittable,
)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    inference_id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    queue_seq INTEGER NOT NULL,
    start_deadline REAL NOT NULL,
    receipt TEXT,
    worker TEXT,
    lease_expires REAL,
    body BLOB,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_fifo ON jobs (endpoint, status, queue_seq);
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (endpoint, status, lease_expires);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (queue_seq);
"""


class SqliteJobQueue:
    """The `JobQueue` in one SQLite file; safe across threads and processes of one machine."""

    def __init__(self, path: Path, *, clock: Clock | None = None, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self.clock: Clock = clock or utcnow
        self.busy_timeout_s = busy_timeout_s
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch(mode=0o600)  # bodies are the users' data
        with self._connect() as db:
            db.execute("PRAGMA journal_mode = WAL")  # persistent: set once per file
        with self._tx() as db:
            # statement by statement: executescript would COMMIT the transaction first
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            self._check_version(db)

    def _check_version(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        if row[0] is None:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise ServerError(
                f"{self.path} has job queue schema {row[0]}, newer than this twinserve's "
                f"{SCHEMA_VERSION}: upgrade twinserve"
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with sqlite_db.connect(self.path, self.busy_timeout_s, synchronous="FULL") as db:
            yield db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the lock from its first statement."""
        with self._connect() as db, sqlite_db.write_transaction(db):
            yield db

    # --- submitting and reading ---

    def submit(self, job: Job) -> Job:
        check_submittable(job)
        with self._tx() as db:
            found = self._row(db, job.inference_id)
            if found is not None:
                return found
            db.execute(
                "INSERT INTO jobs (inference_id, endpoint, status, queue_seq, start_deadline, body, record) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.inference_id,
                    job.endpoint,
                    str(job.status),
                    _next_seq(db),
                    job.expires_at.timestamp(),
                    job.body,
                    json.dumps(job.to_record()),
                ),
            )
        return job

    def get(self, inference_id: str) -> Job:
        with self._connect() as db:
            job = self._row(db, inference_id)
        if job is None:
            raise NotFoundError(f"no async inference {inference_id!r}")
        return job

    def _row(self, db: sqlite3.Connection, inference_id: str) -> Job | None:
        row = db.execute("SELECT record, body FROM jobs WHERE inference_id = ?", (inference_id,)).fetchone()
        return None if row is None else _job(row[0], row[1])

    def list(self, endpoint: str, *, status: JobStatus | None = None, limit: int = 100) -> builtins.list[Job]:
        check_limit(limit, MAX_LIST_LIMIT)
        query, args = "SELECT record, body FROM jobs WHERE endpoint = ?", [endpoint]
        if status is not None:
            query, args = query + " AND status = ?", [*args, str(status)]
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_job(record, body) for record, body in rows]

    def depth(self, endpoint: str) -> int:
        counts = self.counts(endpoint)
        return sum(n for status, n in counts.items() if status.is_backlog)

    def counts(self, endpoint: str) -> dict[JobStatus, int]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT status, count(*) FROM jobs WHERE endpoint = ? GROUP BY status", (endpoint,)
            ).fetchall()
        found = {JobStatus(status): n for status, n in rows}
        return {status: found.get(status, 0) for status in JobStatus}

    def purge(self, endpoint: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE endpoint = ?", (endpoint,))

    def close(self) -> None:
        """Nothing to release: every operation opens and closes its own connection."""

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
        expires = now + timedelta(seconds=visibility_timeout_s)
        leases: builtins.list[Lease] = []
        with self._tx() as db:
            for job in self._redeliverable(db, endpoint, now, limit):
                if job.attempts >= job.max_attempts:
                    reason = f"lease expired on attempt {job.attempts} of {job.max_attempts} (worker lost)"
                    self._finish(db, job, JobStatus.FAILED, now, failure_reason=reason)
                else:
                    leases.append(self._start(db, job, worker, now, expires))
            while len(leases) < limit:
                batch = self._queued(db, endpoint, limit - len(leases))
                if not batch:
                    break
                for job in batch:
                    if job.attempts == 0 and job.expires_at <= now:
                        reason = f"not started within its TTL of {job.ttl_s:g} s"
                        self._finish(db, job, JobStatus.EXPIRED, now, failure_reason=reason)
                    else:
                        leases.append(self._start(db, job, worker, now, expires))
        return leases

    def _redeliverable(
        self, db: sqlite3.Connection, endpoint: str, now: datetime, limit: int
    ) -> builtins.list[Job]:
        rows = db.execute(
            "SELECT record, body FROM jobs WHERE endpoint = ? AND status = ? AND lease_expires <= ? "
            "ORDER BY lease_expires LIMIT ?",
            (endpoint, str(JobStatus.RUNNING), now.timestamp(), limit),
        ).fetchall()
        return [_job(record, body) for record, body in rows]

    def _queued(self, db: sqlite3.Connection, endpoint: str, limit: int) -> builtins.list[Job]:
        rows = db.execute(
            "SELECT record, body FROM jobs WHERE endpoint = ? AND status = ? ORDER BY queue_seq LIMIT ?",
            (endpoint, str(JobStatus.QUEUED), limit),
        ).fetchall()
        return [_job(record, body) for record, body in rows]

    def _start(
        self, db: sqlite3.Connection, job: Job, worker: str, now: datetime, expires: datetime
    ) -> Lease:
        started = job.model_copy(
            update={"status": JobStatus.RUNNING, "attempts": job.attempts + 1, "started_at": now}
        )
        receipt = new_inference_id()
        self._save(db, started, receipt=receipt, worker=worker, lease_expires=expires.timestamp())
        return Lease(job=started, receipt=receipt, worker=worker, expires_at=expires)

    def _finish(
        self, db: sqlite3.Connection, job: Job, status: JobStatus, now: datetime, **fields: Any
    ) -> Job:
        done = job.model_copy(update={"status": status, "finished_at": now, **fields})
        self._save(db, done)
        return done

    def _save(self, db: sqlite3.Connection, job: Job, **lease: Any) -> None:
        """Write the job's progress; the lease columns are cleared unless given."""
        db.execute(
            "UPDATE jobs SET status = ?, record = ?, receipt = ?, worker = ?, lease_expires = ? "
            "WHERE inference_id = ?",
            (
                str(job.status),
                json.dumps(job.to_record()),
                lease.get("receipt"),
                lease.get("worker"),
                lease.get("lease_expires"),
                job.inference_id,
            ),
        )

    def _held(self, db: sqlite3.Connection, lease: Lease) -> Job:
        """The job if `lease` is its current lease; LeaseLostError if another delivery holds it,
        or it is finished or gone."""
        row = db.execute(
            "SELECT record, body, receipt FROM jobs WHERE inference_id = ?", (lease.job.inference_id,)
        ).fetchone()
        if row is None:
            raise LeaseLostError(f"job {lease.job.inference_id} is gone (its endpoint was purged)")
        job = _job(row[0], row[1])
        if job.status is not JobStatus.RUNNING or row[2] != lease.receipt:
            raise LeaseLostError(
                f"job {job.inference_id} is no longer held by this lease of {lease.worker} (now {job.status})"
            )
        return job

    # --- settling a lease ---

    def heartbeat(self, lease: Lease, extend_s: float) -> Lease:
        check_lease_args(extend_s)
        expires = self.clock() + timedelta(seconds=extend_s)
        with self._tx() as db:
            job = self._held(db, lease)
            db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE inference_id = ?",
                (expires.timestamp(), job.inference_id),
            )
        return lease.model_copy(update={"job": job, "expires_at": expires})

    def complete(self, lease: Lease, output_location: str) -> bool:
        with self._tx() as db:
            job = self._row(db, lease.job.inference_id)
            if job is None or job.status.is_final:
                return False  # a redelivered copy finished first: its result stands
            self._finish(
                db,
                job,
                JobStatus.SUCCEEDED,
                self.clock(),
                output_location=output_location,
                failure_reason=None,
            )
        return True

    def fail(
        self, lease: Lease, reason: str, *, retry: bool = True, failure_location: str | None = None
    ) -> Job:
        with self._tx() as db:
            current = self._row(db, lease.job.inference_id)
            if current is not None and current.status.is_final:
                return current  # settled by another delivery; a late failure changes nothing
            job = self._held(db, lease)
            if retry and job.attempts < job.max_attempts:
                queued = job.model_copy(update={"status": JobStatus.QUEUED, "failure_reason": reason})
                self._save(db, queued)
                db.execute(
                    "UPDATE jobs SET queue_seq = ? WHERE inference_id = ?", (_next_seq(db), job.inference_id)
                )
                return queued
            return self._finish(
                db,
                job,
                JobStatus.FAILED,
                self.clock(),
                failure_reason=reason,
                failure_location=failure_location,
            )


def _next_seq(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT coalesce(max(queue_seq), 0) + 1 FROM jobs").fetchone()[0])


def _job(record: str, body: bytes | None) -> Job:
    return Job.model_validate({**json.loads(record), "body": body})
