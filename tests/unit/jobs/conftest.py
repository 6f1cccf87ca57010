"""Fixtures of the job queue suite: one `queue` fixture over both backends, a fake clock, and a
way to let leases run out that works for both (see `expire_leases`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.redis_server import redis_server
from twinserve.jobs.queue import JobQueue, open_queue

# A lease this short runs out while the test waits for it (Redis follows its own clock).
SHORT_LEASE_S = 0.05


@dataclass
class FakeClock:
    """A clock the test moves; queues read it wherever they record or compare a time."""

    now: datetime = field(default_factory=lambda: datetime(2026, 1, 1, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:  # skips where redis-server is missing, fails under CI=true
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty queue of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    import redis

    url: str = request.getfixturevalue("redis_url")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def queue(queue_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[JobQueue]:
    q = open_queue(queue_url, state_dir=tmp_path, clock=clock)
    yield q
    q.close()


@pytest.fixture
def expire_leases(queue_url: str, clock: FakeClock) -> Callable[[], None]:
    """Let leases of SHORT_LEASE_S run out: the SQLite queue follows the fake clock; the Redis
    queue times leases by the server's clock, so for it the test also waits that long."""

    def expire() -> None:
        clock.advance(SHORT_LEASE_S + 1)
        if queue_url.startswith("redis://"):
            time.sleep(SHORT_LEASE_S * 2)

    return expire
