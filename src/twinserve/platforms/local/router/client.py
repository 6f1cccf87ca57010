"""What the control plane asks an endpoint's router: who it routes to, and how busy they are.

The control plane changes the state store; the router follows within its sync interval. The
waits here close that gap where it matters: traffic moves to a new replica only after the
router has seen it healthy, and an old one is stopped only after the router stopped sending
it new requests, so a blue/green switch or a scale-in drops nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from twinserve.deploy.spec import Endpoint
from twinserve.platforms.local.router.pool import GroupStats
from twinserve.server.process import probe_client

_TIMEOUT_S = 2.0
ROUTER_SEES_S = 15.0  # how long the router may take to apply a change (store sync 0.5 s + a health round)


class RouterClient:
    """Sync client of one router's own routes (`/router/replicas`, `/router/stats`)."""

    def __init__(self, endpoint: Endpoint) -> None:
        if endpoint.url is None:
            raise ValueError(f"endpoint {endpoint.name!r} has no router URL yet")
        self.url = endpoint.url
        key = endpoint.config.api_key
        self._headers = {"authorization": f"Bearer {key.get_secret_value()}"} if key else {}

    def _get(self, path: str) -> dict[str, Any]:
        response = probe_client().get(f"{self.url}{path}", headers=self._headers, timeout=_TIMEOUT_S)
        response.raise_for_status()
        data = response.json()
        return data if isinstance(data, dict) else {}

    def replicas(self) -> list[dict[str, Any]]:
        """The router's pool: id, url, variant (traffic group), status, outstanding, … per replica."""
        return list(self._get("/router/replicas").get("replicas", []))

    def stats(self) -> dict[str, GroupStats]:
        """Per traffic group: replicas taking requests, requests in flight, requests routed so far."""
        groups = self._get("/router/stats").get("groups", {})
        return {name: GroupStats.model_validate(value) for name, value in groups.items()}

    def weights(self) -> dict[str, float]:
        """The traffic weight per group the router applies now."""
        return dict(self._get("/router/replicas").get("weights", {}))

    def wait_weights(self, want: dict[str, float], timeout: float) -> bool:
        """Poll until the router applies `want` (it syncs them from the store)."""
        return self._poll(lambda: self.weights() == want, timeout)

    def wait_for(self, check: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        """Poll the pool until `check(replicas)` holds (True) or `timeout` passes (False)."""
        return self._poll(lambda: check(self.replicas()), timeout)

    @staticmethod
    def _poll(condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return True
            except (httpx.HTTPError, ValueError):
                pass  # a router restarting: keep asking until the deadline
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def wait_healthy(self, ids: Iterable[str], timeout: float) -> bool:
        """Every replica in `ids` is in the pool and healthy."""
        wanted = set(ids)
        return self.wait_for(lambda rs: wanted <= {r["id"] for r in rs if r["status"] == "healthy"}, timeout)

    def wait_not_routed(self, ids: Iterable[str], timeout: float) -> bool:
        """No replica in `ids` takes new requests (each is gone from the pool or draining)."""
        unwanted = set(ids)
        return self.wait_for(
            lambda rs: not any(r["id"] in unwanted and not r["draining"] for r in rs), timeout
        )
