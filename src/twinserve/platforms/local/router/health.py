"""Background health checks: a replica takes traffic only while its `/health` answers 200.

One asyncio task polls every replica (draining ones too, for the listing) concurrently each
interval; a non-200, a timeout or a connection error marks it unhealthy until the next 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from twinserve.platforms.local.router.pool import Replica, ReplicaPool

log = logging.getLogger(__name__)


class HealthChecker:
    """Polls `GET {replica}/health` every `interval` seconds while started."""

    def __init__(
        self, pool: ReplicaPool, client: httpx.AsyncClient, *, interval: float = 1.0, timeout: float = 2.0
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be > 0")
        self.pool = pool
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="router-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def check_soon(self) -> None:
        """Run the next round now, not at the end of the interval (after adding replicas).

        Thread-safe: a control plane may call it from outside the router's event loop.
        """
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def check_all(self) -> None:
        """One round over every replica in the pool."""
        await asyncio.gather(*(self.check(r) for r in self.pool.replicas()))

    async def check(self, replica: Replica) -> bool:
        try:
            response = await self.client.get(f"{replica.url}/health", timeout=self.timeout)
        except httpx.HTTPError as exc:
            ok, reason = False, f"health check failed: {type(exc).__name__}: {exc}"
        else:
            ok, reason = response.status_code == 200, f"health check answered {response.status_code}"
        if ok:
            if not replica.healthy:
                log.info("replica %s is healthy", replica.id)
            self.pool.mark_healthy(replica)
        else:
            if replica.healthy:
                log.warning("replica %s is unhealthy: %s", replica.id, reason)
            self.pool.mark_unhealthy(replica, reason)
        return ok

    async def _run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking for good
                log.exception("health check round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
