"""The job queue's contract, one suite run against both backends (SQLite and Redis Streams)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError as PydanticValidationError

from tests.unit.jobs.conftest import SHORT_LEASE_S, FakeClock
from twinserve.errors import NotFoundError, ValidationError
from twinserve.jobs.model import MAX_INLINE_BODY_BYTES, Job, JobStatus, utcnow
from twinserve.jobs.queue import JobQueue, LeaseLostError, open_queue

EP = "chat"
LONG_LEASE_S = 60.0


@pytest.fixture
def make_job(clock: FakeClock) -> Callable[..., Job]:
    counter = iter(range(10**6))

    def make(endpoint: str = EP, **overrides: Any) -> Job:
        values: dict[str, Any] = {"endpoint": endpoint, "created_at": clock.now}
        if "input_location" not in overrides:
            values["body"] = b'{"inputs": "%d"}' % next(counter)
        return Job(**{**values, **overrides})

    return make


def lease_one(queue: JobQueue, worker: str = "w1", timeout: float = LONG_LEASE_S, endpoint: str = EP) -> Any:
    leases = queue.lease(endpoint, worker, visibility_timeout_s=timeout)
    assert len(leases) == 1, leases
    return leases[0]


# --- submit, get, list ---


def test_submit_get_list(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    jobs = [queue.submit(make_job()) for _ in range(3)]
    located = queue.submit(make_job(input_location="s3://bucket/in/1.json"))
    assert [queue.get(j.inference_id) for j in jobs] == jobs
    assert queue.get(located.inference_id).input_location == "s3://bucket/in/1.json"
    assert queue.get(located.inference_id).body is None
    assert [j.inference_id for j in queue.list(EP)] == [j.inference_id for j in [located, *reversed(jobs)]]
    assert len(queue.list(EP, limit=2)) == 2
    assert queue.list(EP, status=JobStatus.SUCCEEDED) == []
    assert queue.list("other") == []
    with pytest.raises(NotFoundError):
        queue.get("nope")


def test_submit_is_idempotent(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    first = queue.submit(make_job(inference_id="abc"))
    again = queue.submit(make_job(inference_id="abc", body=b"different"))
    assert again == first and queue.get("abc").body == first.body
    assert queue.depth(EP) == 1


def test_inline_body_limit(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    assert queue.submit(make_job(body=b"x" * MAX_INLINE_BODY_BYTES)).body is not None
    with pytest.raises(ValidationError, match="input_location"):
        queue.submit(make_job(body=b"x" * (MAX_INLINE_BODY_BYTES + 1)))


def test_a_job_needs_exactly_one_input() -> None:
    with pytest.raises(PydanticValidationError, match="exactly one"):
        Job(endpoint=EP)
    with pytest.raises(PydanticValidationError, match="exactly one"):
        Job(endpoint=EP, body=b"{}", input_location="s3://b/k")
    with pytest.raises(PydanticValidationError, match="file:// or s3://"):
        Job(endpoint=EP, input_location="http://example.com/x")
    assert [s for s in JobStatus if s.is_final] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.EXPIRED]


# --- leasing ---


def test_lease_is_fifo(queue: JobQueue, make_job: Callable[..., Job], clock: FakeClock) -> None:
    jobs = [queue.submit(make_job()) for _ in range(5)]
    first = queue.lease(EP, "w1", visibility_timeout_s=30, limit=2)
    rest = queue.lease(EP, "w2", visibility_timeout_s=30, limit=10)
    assert [le.job.inference_id for le in first + rest] == [j.inference_id for j in jobs]
    assert queue.lease(EP, "w3", visibility_timeout_s=30) == []
    lease = first[0]
    assert lease.job.status is JobStatus.RUNNING and lease.job.attempts == 1 and lease.worker == "w1"
    assert lease.job.started_at == clock.now and lease.expires_at == clock.now + timedelta(seconds=30)
    assert len({le.receipt for le in first + rest}) == 5
    assert queue.get(lease.job.inference_id).status is JobStatus.RUNNING


def test_refuses_bad_arguments(queue: JobQueue) -> None:
    with pytest.raises(ValidationError):
        queue.lease(EP, "w1", visibility_timeout_s=0)
    with pytest.raises(ValidationError):
        queue.lease(EP, "w1", visibility_timeout_s=30, limit=0)
    with pytest.raises(ValidationError):
        queue.list(EP, limit=0)


def test_concurrent_threads_never_share_a_job(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    ids = {queue.submit(make_job()).inference_id for _ in range(40)}
    got: list[str] = []
    lock = threading.Lock()

    def work(worker: str) -> None:
        while leases := queue.lease(EP, worker, visibility_timeout_s=LONG_LEASE_S, limit=3):
            with lock:
                got.extend(le.job.inference_id for le in leases)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == sorted(ids)  # every job once, none twice


# Each worker waits for the other to be ready (imports take longer than leasing 60 jobs), so
# that the two really lease at the same time.
_WORKER = """
import sys, time
from pathlib import Path
from twinserve.jobs.queue import open_queue
q = open_queue(sys.argv[1], state_dir=Path(sys.argv[2]))
ready = Path(sys.argv[2], "ready-" + sys.argv[3])
ready.touch()
while len(list(ready.parent.glob("ready-*"))) < 2:
    time.sleep(0.01)
while leases := q.lease("chat", sys.argv[3], visibility_timeout_s=60):
    print(leases[0].job.inference_id, flush=True)
"""


def test_concurrent_processes_never_share_a_job(
    queue: JobQueue, queue_url: str, make_job: Callable[..., Job], tmp_path: Path
) -> None:
    # the workers read the real clock: jobs made now, not at the fake clock's time, are not past their TTL
    ids = {queue.submit(make_job(created_at=utcnow())).inference_id for _ in range(60)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, queue_url, str(tmp_path), f"p{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outs[0] + outs[1]) == sorted(ids)  # every job once, none twice


# --- redelivery, heartbeats, completion ---


def test_expired_lease_is_redelivered(
    queue: JobQueue, make_job: Callable[..., Job], expire_leases: Callable[[], None]
) -> None:
    job = queue.submit(make_job())
    stale = lease_one(queue, "w1", SHORT_LEASE_S)
    expire_leases()
    fresh = lease_one(queue, "w2")
    assert fresh.job.inference_id == job.inference_id and fresh.receipt != stale.receipt
    assert fresh.job.attempts == 2 and fresh.worker == "w2"
    with pytest.raises(LeaseLostError):
        queue.heartbeat(stale, 30)
    with pytest.raises(LeaseLostError):
        queue.fail(stale, "late failure")
    assert queue.complete(fresh, "file:///out/fresh")
    assert not queue.complete(stale, "file:///out/stale")  # first completion wins
    assert queue.get(job.inference_id).output_location == "file:///out/fresh"


def test_late_worker_completing_first_wins(
    queue: JobQueue, make_job: Callable[..., Job], expire_leases: Callable[[], None]
) -> None:
    job = queue.submit(make_job())
    stale = lease_one(queue, "w1", SHORT_LEASE_S)
    expire_leases()
    fresh = lease_one(queue, "w2")
    assert queue.complete(stale, "file:///out/first")
    assert not queue.complete(fresh, "file:///out/second")
    done = queue.get(job.inference_id)
    assert done.status is JobStatus.SUCCEEDED and done.output_location == "file:///out/first"
    with pytest.raises(LeaseLostError):
        queue.heartbeat(fresh, 30)
    assert queue.fail(fresh, "too late") == done  # a final job is not changed by a failure
    assert queue.lease(EP, "w3", visibility_timeout_s=30) == [] and queue.depth(EP) == 0


def test_held_lease_is_not_redelivered(
    queue: JobQueue, make_job: Callable[..., Job], clock: FakeClock
) -> None:
    queue.submit(make_job())
    lease_one(queue, "w1", LONG_LEASE_S)
    clock.advance(LONG_LEASE_S / 2)
    assert queue.lease(EP, "w2", visibility_timeout_s=30) == []


def test_heartbeat_extends_the_lease(
    queue: JobQueue, make_job: Callable[..., Job], clock: FakeClock, expire_leases: Callable[[], None]
) -> None:
    queue.submit(make_job())
    lease = lease_one(queue, "w1", SHORT_LEASE_S)
    extended = queue.heartbeat(lease, LONG_LEASE_S)
    assert extended.receipt == lease.receipt and extended.expires_at == clock.now + timedelta(
        seconds=LONG_LEASE_S
    )
    expire_leases()
    assert queue.lease(EP, "w2", visibility_timeout_s=30) == []
    assert queue.complete(extended, "file:///out/1")


def test_lost_worker_uses_up_attempts(
    queue: JobQueue, make_job: Callable[..., Job], expire_leases: Callable[[], None]
) -> None:
    job = queue.submit(make_job(max_attempts=2))
    for worker in ("w1", "w2"):
        lease_one(queue, worker, SHORT_LEASE_S)
        expire_leases()
    assert queue.lease(EP, "w3", visibility_timeout_s=30) == []
    failed = queue.get(job.inference_id)
    assert failed.status is JobStatus.FAILED and failed.attempts == 2
    assert failed.failure_reason is not None and "lease expired" in failed.failure_reason


# --- TTL ---


def test_job_not_started_within_ttl_expires(
    queue: JobQueue, make_job: Callable[..., Job], clock: FakeClock
) -> None:
    old = queue.submit(make_job(ttl_s=10))
    young = queue.submit(make_job(ttl_s=1000))
    clock.advance(20)
    (lease,) = queue.lease(EP, "w1", visibility_timeout_s=30)
    assert lease.job.inference_id == young.inference_id  # the expired one is skipped, not leased
    expired = queue.get(old.inference_id)
    assert expired.status is JobStatus.EXPIRED and expired.finished_at == clock.now
    assert expired.failure_reason is not None and "TTL" in expired.failure_reason
    assert queue.counts(EP)[JobStatus.EXPIRED] == 1


def test_ttl_uses_the_given_now_and_spares_started_jobs(
    queue: JobQueue, make_job: Callable[..., Job], clock: FakeClock
) -> None:
    job = queue.submit(make_job(ttl_s=60))
    (lease,) = queue.lease(EP, "w1", visibility_timeout_s=30, now=clock.now + timedelta(seconds=59))
    assert queue.fail(lease, "oom").status is JobStatus.QUEUED
    clock.advance(3600)  # a job once started is retried however late
    assert lease_one(queue, "w2").job.inference_id == job.inference_id


# --- failures and retries ---


def test_retries_then_fails_with_the_reason(
    queue: JobQueue, make_job: Callable[..., Job], clock: FakeClock
) -> None:
    job = queue.submit(make_job(max_attempts=3))
    for attempt in (1, 2, 3):
        lease = lease_one(queue, f"w{attempt}")
        assert lease.job.attempts == attempt
        after = queue.fail(lease, f"boom {attempt}")
        assert after.failure_reason == f"boom {attempt}"
        assert after.status is (JobStatus.QUEUED if attempt < 3 else JobStatus.FAILED)
    failed = queue.get(job.inference_id)
    assert failed.status is JobStatus.FAILED and failed.finished_at == clock.now
    assert queue.lease(EP, "w4", visibility_timeout_s=30) == []
    assert queue.depth(EP) == 0 and queue.counts(EP)[JobStatus.FAILED] == 1


def test_fail_without_retry(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    job = queue.submit(make_job(max_attempts=3))
    failed = queue.fail(lease_one(queue), "bad input", retry=False, failure_location="file:///err/1.json")
    assert failed.status is JobStatus.FAILED and failed.attempts == 1
    assert queue.get(job.inference_id).failure_location == "file:///err/1.json"
    assert queue.lease(EP, "w2", visibility_timeout_s=30) == []


def test_a_retry_goes_to_the_back(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    a, b = queue.submit(make_job()), queue.submit(make_job())
    queue.fail(lease_one(queue), "transient")
    order = [le.job.inference_id for le in queue.lease(EP, "w2", visibility_timeout_s=30, limit=5)]
    assert order == [b.inference_id, a.inference_id]


# --- backlog, purge, opening ---


def test_depth_and_counts(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    for _ in range(4):
        queue.submit(make_job())
    queue.submit(make_job(endpoint="other"))
    leases = queue.lease(EP, "w1", visibility_timeout_s=30, limit=2)
    assert queue.complete(leases[0], "file:///out/0")
    counts = queue.counts(EP)
    assert counts == {
        JobStatus.QUEUED: 2,
        JobStatus.RUNNING: 1,
        JobStatus.SUCCEEDED: 1,
        JobStatus.FAILED: 0,
        JobStatus.EXPIRED: 0,
    }
    assert queue.depth(EP) == 3 and queue.depth("other") == 1
    assert [j.status for j in queue.list(EP, status=JobStatus.RUNNING)] == [JobStatus.RUNNING]


def test_purge(queue: JobQueue, make_job: Callable[..., Job]) -> None:
    kept = queue.submit(make_job(endpoint="other"))
    job = queue.submit(make_job(inference_id="gone"))
    queue.submit(make_job())
    lease = lease_one(queue)
    queue.purge(EP)
    with pytest.raises(NotFoundError):
        queue.get(job.inference_id)
    assert queue.list(EP) == [] and queue.depth(EP) == 0
    assert queue.lease(EP, "w2", visibility_timeout_s=30) == []
    with pytest.raises(LeaseLostError):
        queue.heartbeat(lease, 30)
    assert not queue.complete(lease, "file:///out/x")
    assert queue.get(kept.inference_id) == kept
    again = queue.submit(make_job(inference_id="gone"))  # the endpoint can be made again
    assert lease_one(queue).job.inference_id == again.inference_id


def test_open_queue_chooses_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinserve.jobs.queue_sqlite import SqliteJobQueue

    monkeypatch.delenv("TWINSERVE_QUEUE_URL", raising=False)
    default = open_queue(None, state_dir=tmp_path)
    assert isinstance(default, SqliteJobQueue) and isinstance(default, JobQueue)
    assert default.path == tmp_path / "queue.db" and default.path.exists()
    monkeypatch.setenv("TWINSERVE_QUEUE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    configured = open_queue(None, state_dir=tmp_path)
    assert isinstance(configured, SqliteJobQueue) and configured.path == tmp_path / "elsewhere.db"
    with pytest.raises(ValidationError, match="unknown job queue URL"):
        open_queue("amqp://localhost", state_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "redis", None)  # as if the [redis] extra were not installed
    with pytest.raises(ValidationError, match=r"pip install 'twinserve\[redis\]'"):
        open_queue("redis://127.0.0.1:1/0", state_dir=tmp_path)


def test_sqlite_schema_is_versioned(tmp_path: Path) -> None:
    import sqlite3

    from twinserve.errors import ServerError
    from twinserve.jobs.queue_sqlite import SCHEMA_VERSION, SqliteJobQueue

    path = tmp_path / "queue.db"
    SqliteJobQueue(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ServerError, match="newer"):
        SqliteJobQueue(path)


def test_redis_keys_stay_under_the_prefix(redis_url: str, make_job: Callable[..., Job]) -> None:
    import redis

    from twinserve.jobs.queue_redis import PREFIX, RedisJobQueue

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    queue = RedisJobQueue(redis_url)
    queue.submit(make_job(created_at=utcnow()))
    queue.fail(lease_one(queue), "once")
    queue.complete(lease_one(queue), "file:///out/1")
    keys = [k.decode() for k in client.keys("*")]
    assert keys and all(k.startswith(PREFIX) for k in keys)
    queue.purge(EP)
    assert [k for k in client.keys("*") if not k.endswith(b":seq")] == []  # only the id counter remains
    queue.close()
    client.close()


def test_redis_unreachable_is_our_error() -> None:
    from twinserve.errors import UnreachableError
    from twinserve.jobs.queue_redis import RedisJobQueue
    from twinserve.server.process import free_port

    queue = RedisJobQueue(f"redis://:secret@127.0.0.1:{free_port()}/0")
    with pytest.raises(UnreachableError, match="unreachable") as caught:
        queue.depth(EP)
    assert "secret" not in str(caught.value)
