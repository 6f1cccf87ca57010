"""The replicas behind one endpoint URL: who they are, whether they are healthy, how busy they are.

Selection policy (`ReplicaPool.acquire`):
1. Candidates are the replicas that are healthy and not draining (and not already tried by
   this request's earlier attempts).
2. If the candidates belong to several variants, a variant is chosen by its traffic weight with
   smooth weighted round-robin (nginx's algorithm: deterministic, exact over a short window).
   Variants with weight 0 get traffic only when no positive-weight variant has a candidate,
   so a blue/green shift never turns into an outage.
3. Within the variant: least outstanding requests; ties go round-robin.

Removing a replica (or replacing it with another URL under the same id) *drains* it: it takes
no new requests, keeps its in-flight ones, and leaves the pool when its last one finishes.
The pool is thread-safe: a control plane may call `set_replicas` from another thread.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class ReplicaSpec(BaseModel):
    """What the control plane knows about one replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Unique among the pool's active replicas.")
    url: str = Field(min_length=1, description="Base URL, e.g. http://127.0.0.1:8081 (no trailing slash).")
    variant: str = Field(
        "default", min_length=1, description="Variant name; traffic weights are per variant."
    )


class ReplicaStatus(enum.Enum):
    """A replica's state as the router sees it."""

    STARTING = "starting"  # never passed a health check yet
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"  # removed: finishes its in-flight requests, takes no new ones

    @property
    def takes_requests(self) -> bool:
        return self is ReplicaStatus.HEALTHY


class GroupStats(BaseModel):
    """Load of one traffic group (a variant in one generation), for autoscaling."""

    replicas: int = Field(description="Replicas taking requests now (healthy, not draining).")
    in_flight: int = Field(
        description="Requests outstanding on the group's replicas, draining ones included."
    )
    routed_total: int = Field(description="Requests sent to the group since the router started (monotonic).")


class ReplicaInfo(BaseModel):
    """One replica in `GET /router/replicas` and `GET /health`."""

    id: str
    url: str
    variant: str
    status: ReplicaStatus
    healthy: bool
    draining: bool
    outstanding: int
    served: int
    failures: int
    server_errors: int
    last_error: str | None


@dataclass(eq=False)
class Replica:
    """Mutable state of one replica; only the pool changes it (under its lock)."""

    spec: ReplicaSpec
    healthy: bool = False
    ever_healthy: bool = False
    draining: bool = False
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    server_errors: int = 0  # answers with a 5xx status (the request reached the model and failed)
    last_error: str | None = None
    added_at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def status(self) -> ReplicaStatus:
        if self.draining:
            return ReplicaStatus.DRAINING
        if self.healthy:
            return ReplicaStatus.HEALTHY
        return ReplicaStatus.UNHEALTHY if self.ever_healthy else ReplicaStatus.STARTING

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            id=self.id,
            url=self.url,
            variant=self.spec.variant,
            status=self.status,
            healthy=self.healthy,
            draining=self.draining,
            outstanding=self.outstanding,
            served=self.served,
            failures=self.failures,
            server_errors=self.server_errors,
            last_error=self.last_error,
        )


class ReplicaPool:
    """The replicas of one endpoint, their health and load, and the selection policy."""

    def __init__(
        self, replicas: Iterable[ReplicaSpec] = (), *, weights: Mapping[str, float] | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._replicas: list[Replica] = []
        self._weights: dict[str, float] = {}
        self._current: dict[str, float] = {}  # smooth weighted round-robin state per variant
        self._tiebreak = itertools.count()
        self._routed: dict[str, int] = {}  # per variant; survives its replicas leaving the pool
        self.set_replicas(replicas, weights=weights)

    # ------------------------------------------------------------ membership
    def set_replicas(
        self, specs: Iterable[ReplicaSpec], *, weights: Mapping[str, float] | None = None
    ) -> None:
        """Make `specs` the active set: add the new, drain the missing, replace changed URLs.

        A replica whose id and URL are unchanged keeps its health and counters (its variant
        may change). `weights`, if given, replaces the variant weights.
        """
        specs = list(specs)
        ids = [s.id for s in specs]
        if len(ids) != len(set(ids)):
            raise ValueError(f"duplicate replica ids in {ids}")
        with self._lock:
            if weights is not None:
                self._set_weights(weights)
            wanted = {s.id: s for s in specs}
            for replica in self._active():
                spec = wanted.get(replica.id)
                if spec is not None and spec.url == replica.url:
                    replica.spec = spec
                    del wanted[spec.id]
                else:
                    self._drain(replica)
            self._replicas.extend(Replica(spec) for spec in wanted.values())

    def add(self, spec: ReplicaSpec) -> None:
        """Add one replica (it takes traffic after its first good health check)."""
        with self._lock:
            if any(r.id == spec.id for r in self._active()):
                raise ValueError(f"replica {spec.id!r} is already in the pool")
            self._replicas.append(Replica(spec))

    def remove(self, replica_id: str) -> bool:
        """Drain a replica: no new requests; it leaves when its in-flight ones are done."""
        with self._lock:
            for replica in self._active():
                if replica.id == replica_id:
                    self._drain(replica)
                    return True
        return False

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Traffic weight per variant (relative; a variant not named has weight 1)."""
        with self._lock:
            self._set_weights(weights)

    def is_drained(self, replica_id: str) -> bool:
        """True when no replica with this id is draining or active (safe to stop its process)."""
        with self._lock:
            return not any(r.id == replica_id for r in self._replicas)

    async def wait_drained(self, replica_id: str, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Wait until `is_drained(replica_id)`; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_drained(replica_id):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll)
        return True

    # ------------------------------------------------------------ selection
    def acquire(self, exclude: Iterable[str] = ()) -> Replica | None:
        """Pick a replica for one request and count it as outstanding; None if none can take it.

        Every successful acquire must be paired with exactly one `release`.
        """
        excluded = set(exclude)
        with self._lock:
            candidates = [r for r in self._replicas if r.status.takes_requests and r.id not in excluded]
            if not candidates:
                return None
            variant = self._pick_variant({r.spec.variant for r in candidates})
            group = [r for r in candidates if r.spec.variant == variant]
            least = min(r.outstanding for r in group)
            tied = [r for r in group if r.outstanding == least]
            replica = tied[next(self._tiebreak) % len(tied)]
            replica.outstanding += 1
            self._routed[variant] = self._routed.get(variant, 0) + 1
            return replica

    def release(self, replica: Replica, *, served: bool, status: int | None = None) -> None:
        """End one request on `replica`; `served` when a response came back (any `status`)."""
        with self._lock:
            replica.outstanding -= 1
            if served:
                replica.served += 1
            if status is not None and status >= 500:
                replica.server_errors += 1
            if replica.draining and replica.outstanding <= 0:
                self._forget(replica)

    # ------------------------------------------------------------ health
    def mark_healthy(self, replica: Replica) -> None:
        with self._lock:
            replica.healthy = True
            replica.ever_healthy = True

    def mark_unhealthy(self, replica: Replica, reason: str) -> None:
        """After a failed health check or a connection error on a forwarded request."""
        with self._lock:
            if replica.healthy:
                replica.failures += 1
            replica.healthy = False
            replica.last_error = reason

    def count_failure(self, replica: Replica, reason: str) -> None:
        """A forwarded request failed on this replica (counted even if it was already unhealthy)."""
        with self._lock:
            replica.failures += 1
            replica.healthy = False
            replica.last_error = reason

    # ------------------------------------------------------------ views
    def replicas(self) -> list[Replica]:
        """Every replica still in the pool, draining ones included (a copy of the list)."""
        with self._lock:
            return list(self._replicas)

    def snapshot(self) -> list[ReplicaInfo]:
        with self._lock:
            return [r.info() for r in self._replicas]

    def stats(self) -> dict[str, GroupStats]:
        """Per variant (traffic group): capacity, in-flight requests and requests routed so far."""
        with self._lock:
            names = {r.spec.variant for r in self._replicas} | set(self._routed)
            return {
                name: GroupStats(
                    replicas=sum(r.spec.variant == name and r.status.takes_requests for r in self._replicas),
                    in_flight=sum(r.outstanding for r in self._replicas if r.spec.variant == name),
                    routed_total=self._routed.get(name, 0),
                )
                for name in sorted(names)
            }

    @property
    def weights(self) -> dict[str, float]:
        with self._lock:
            return dict(self._weights)

    def num_available(self) -> int:
        with self._lock:
            return sum(r.status.takes_requests for r in self._replicas)

    # ------------------------------------------------------------ internals (lock held)
    def _active(self) -> list[Replica]:
        return [r for r in self._replicas if not r.draining]

    def _drain(self, replica: Replica) -> None:
        replica.draining = True
        if replica.outstanding <= 0:
            self._forget(replica)

    def _forget(self, replica: Replica) -> None:
        if replica in self._replicas:
            self._replicas.remove(replica)

    def _set_weights(self, weights: Mapping[str, float]) -> None:
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"variant weights must be >= 0: {dict(weights)}")
        self._weights = dict(weights)
        self._current.clear()

    def _pick_variant(self, variants: set[str]) -> str:
        if len(variants) == 1:
            return next(iter(variants))
        weighted = {v: self._weights.get(v, 1.0) for v in sorted(variants)}
        positive = {v: w for v, w in weighted.items() if w > 0}
        if not positive:  # only zero-weight variants are up: better them than a 503
            return min(weighted)
        # smooth weighted round-robin: each pick, every variant gains its weight, the
        # richest is chosen and pays the total; picks interleave in exact proportion.
        total = sum(positive.values())
        for v, w in positive.items():
            self._current[v] = self._current.get(v, 0.0) + w
        chosen = max(positive, key=lambda v: self._current[v])
        self._current[chosen] -= total
        return chosen
