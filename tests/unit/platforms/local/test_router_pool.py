"""ReplicaPool: membership, draining and the selection policy (no servers needed)."""

from __future__ import annotations

import pytest

from twinserve.platforms.local.router.pool import Replica, ReplicaPool, ReplicaSpec, ReplicaStatus


def _pool(*specs: tuple[str, str], weights: dict[str, float] | None = None) -> ReplicaPool:
    pool = ReplicaPool(
        [ReplicaSpec(id=i, url=f"http://127.0.0.1:{9000 + n}", variant=v) for n, (i, v) in enumerate(specs)],
        weights=weights,
    )
    for replica in pool.replicas():
        pool.mark_healthy(replica)
    return pool


def _take(pool: ReplicaPool, exclude: tuple[str, ...] = ()) -> Replica:
    replica = pool.acquire(exclude)
    assert replica is not None
    return replica


def test_least_outstanding_with_round_robin_ties() -> None:
    pool = _pool(("a", "v"), ("b", "v"), ("c", "v"))
    first = [_take(pool).id for _ in range(3)]
    assert sorted(first) == ["a", "b", "c"]  # each gets one before anyone gets two
    pool.release(next(r for r in pool.replicas() if r.id == "b"), served=True)
    assert _take(pool).id == "b"
    assert _take(pool, exclude=("a", "b")).id == "c"


def test_only_healthy_non_draining_replicas_are_chosen() -> None:
    pool = ReplicaPool([ReplicaSpec(id="new", url="http://127.0.0.1:1")])
    assert pool.snapshot()[0].status is ReplicaStatus.STARTING and pool.acquire() is None
    replica = pool.replicas()[0]
    pool.mark_healthy(replica)
    assert _take(pool) is replica
    pool.mark_unhealthy(replica, "health check answered 503")
    info = pool.snapshot()[0]
    assert info.status is ReplicaStatus.UNHEALTHY and info.failures == 1 and pool.acquire() is None
    pool.release(replica, served=True)


def test_draining_keeps_in_flight_and_leaves_when_done() -> None:
    pool = _pool(("a", "v"), ("b", "v"))
    held = _take(pool, exclude=("b",))
    assert pool.remove("a") and not pool.is_drained("a")
    assert pool.snapshot()[0].status is ReplicaStatus.DRAINING
    assert {_take(pool).id for _ in range(3)} == {"b"}
    pool.release(held, served=True)
    assert pool.is_drained("a") and [r.id for r in pool.snapshot()] == ["b"]
    assert pool.remove("b") and pool.is_drained("b") is False  # b still has 3 outstanding


def test_set_replicas_keeps_unchanged_drains_missing_and_replaces_moved() -> None:
    pool = _pool(("a", "v"), ("b", "v"))
    held = _take(pool, exclude=("b",))
    a_state = pool.replicas()[0]
    pool.set_replicas([ReplicaSpec(id="a", url="http://127.0.0.1:9999"), ReplicaSpec(id="c", url="http://x")])
    ids = [(r.id, r.status) for r in pool.replicas()]
    # old a drains (it has a request), b is gone, new a and c wait for a health check
    assert ids == [
        ("a", ReplicaStatus.DRAINING),
        ("a", ReplicaStatus.STARTING),
        ("c", ReplicaStatus.STARTING),
    ]
    pool.release(held, served=True)
    assert a_state not in pool.replicas()
    with pytest.raises(ValueError, match="duplicate"):
        pool.set_replicas([ReplicaSpec(id="z", url="u"), ReplicaSpec(id="z", url="v")])
    with pytest.raises(ValueError, match="already"):
        pool.add(ReplicaSpec(id="c", url="http://y"))


def test_variant_weights_split_traffic_exactly_and_zero_weight_is_a_fallback() -> None:
    pool = _pool(("blue", "blue"), ("green", "green"), weights={"blue": 9, "green": 1})
    picks = []
    for _ in range(20):
        replica = _take(pool)
        picks.append(replica.id)
        pool.release(replica, served=True)
    assert picks.count("blue") == 18 and picks.count("green") == 2
    pool.set_weights({"blue": 0, "green": 1})
    assert _take(pool).id == "green"
    assert _take(pool, exclude=("green",)).id == "blue"  # better a zero-weight variant than a 503
    with pytest.raises(ValueError):
        pool.set_weights({"blue": -1})


def test_server_errors_are_counted_per_replica() -> None:
    pool = ReplicaPool([ReplicaSpec(id="a", url="http://a")])
    replica = pool.replicas()[0]
    pool.mark_healthy(replica)
    for status in (200, 422, 500, 503):
        got = pool.acquire()
        assert got is replica
        pool.release(got, served=True, status=status)
    info = pool.snapshot()[0]
    assert (info.served, info.server_errors) == (4, 2)
