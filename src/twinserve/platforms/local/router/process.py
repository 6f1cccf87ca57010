"""An endpoint's router as its own process: `python -m twinserve.platforms.local.router.process`.

The router must outlive the CLI that created the endpoint, so it runs detached (its own
session), serves `create_router_app(pool)` on 127.0.0.1:PORT with uvicorn, and keeps the
pool in step with the state store: every `--sync-interval` seconds the endpoint's replica
rows in state starting/healthy become the pool's `ReplicaSpec`s, grouped by variant and
generation (`name@N`, so blue and green are separate groups), and `Endpoint.traffic_weights`
the groups' weights (the variants' weights, shifted to the target during an update). The store says who *exists*; the pool's own health checker decides who
gets traffic. SIGTERM drains in-flight requests (uvicorn's graceful shutdown) and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from twinserve.deploy.spec import ReplicaState
from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError
from twinserve.platforms.local.daemons import configure_logging
from twinserve.platforms.local.router.app import RouterApp, create_router_app
from twinserve.platforms.local.router.metrics import metrics_exposition
from twinserve.platforms.local.router.pool import ReplicaPool, ReplicaSpec

if TYPE_CHECKING:
    from twinserve.platforms.local.platform import LocalPlatform

log = logging.getLogger("twinserve.router")

MODULE = "twinserve.platforms.local.router.process"
_ROUTED_STATES = (ReplicaState.STARTING, ReplicaState.HEALTHY)


def sync_pool(store: StateStore, name: str, pool: ReplicaPool, app: RouterApp | None = None) -> bool:
    """Make the pool's membership and weights (and the app's job service URL) match the store;
    True if the membership changed."""
    try:
        endpoint = store.get_endpoint(name)
    except NotFoundError:
        # deleted meanwhile: the control plane is about to stop us; keep serving what is left
        return False
    if app is not None:
        app.async_upstream = endpoint.async_url
    specs = [
        ReplicaSpec(id=r.id, url=r.url, variant=r.traffic_group)
        for r in endpoint.replicas
        if r.state in _ROUTED_STATES
    ]
    before = {(r.id, r.url) for r in pool.replicas()}
    pool.set_replicas(specs, weights=endpoint.traffic_weights())
    return before != {(s.id, s.url) for s in specs}


class _Periodic:
    """A daemon thread calling `tick` every `interval` s until stopped or `tick` returns False;
    a failing tick (a store hiccup) is logged and the next one runs as usual."""

    def __init__(self, thread_name: str, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def tick(self) -> bool:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.tick():
                    return
            except Exception:
                log.exception("%s failed", self._thread.name)


class ControllerWatch(_Periodic):
    """Restarts the endpoint's controller when it dies (the controller's reconcile restarts a
    dead router): killing either heals without a command."""

    def __init__(self, store: StateStore, name: str, home: Path, interval: float) -> None:
        super().__init__("controller-watch", interval)
        self.store, self.name, self.home = store, name, home
        self._manager: LocalPlatform | None = None

    def tick(self) -> bool:
        if self._manager is None:
            # imported here: the router's start does not pay for the control plane it rarely needs
            from twinserve.platforms.local.local_runtime import LocalRuntime
            from twinserve.platforms.local.platform import LocalPlatform

            self._manager = LocalPlatform(self.store, LocalRuntime(self.store, home=self.home))
        try:
            if self._manager.supervise_controller(self.name):
                log.warning("the controller of %r had died; restarted it", self.name)
        except NotFoundError:
            return False  # deleted: nothing left to supervise
        return True


class PoolSync(_Periodic):
    """Runs `sync_pool` every `interval` s (the pool is thread-safe)."""

    def __init__(self, store: StateStore, name: str, app: RouterApp, interval: float) -> None:
        super().__init__("router-sync", interval)
        self.store, self.name, self.app = store, name, app

    def tick(self) -> bool:
        if sync_pool(self.store, self.name, self.app.pool, self.app) and self.app.health is not None:
            self.app.health.check_soon()  # new replicas take traffic at once, not next round
        return True


def run(
    name: str,
    port: int,
    state: Path | None,
    *,
    sync_interval: float = 0.5,
    drain_s: float = 30.0,
    home: Path | None = None,
    watch_interval: float = 2.0,
) -> None:
    """Serve the router until SIGTERM/SIGINT."""
    import uvicorn

    store = StateStore(state)
    endpoint = store.get_endpoint(name)  # NotFoundError: nothing to route
    key = endpoint.config.api_key
    pool = ReplicaPool()
    sync_pool(store, name, pool)  # before lifespan: its first health round sees the replicas
    app = create_router_app(
        pool,
        api_key=key.get_secret_value() if key else None,
        payload_limit=endpoint.config.payload_limit,
        metrics=lambda: metrics_exposition(pool, store, name),
    )
    app.async_upstream = endpoint.async_url
    syncer = PoolSync(store, name, app, sync_interval)
    syncer.start()
    watch = ControllerWatch(store, name, home, watch_interval) if home is not None else None
    if watch is not None:
        watch.start()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        access_log=False,  # the control plane polls /health; replicas log the real requests
        log_level="info",
        timeout_graceful_shutdown=max(1, round(drain_s)),
    )
    try:
        uvicorn.Server(config).run()
    finally:
        syncer.stop()
        if watch is not None:
            watch.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="Endpoint name in the state store.")
    parser.add_argument("--port", type=int, required=True, help="Port on 127.0.0.1.")
    parser.add_argument("--state", type=Path, default=None, help="State store file (default: under home).")
    parser.add_argument("--sync-interval", type=float, default=0.5, help="Seconds between store reads.")
    parser.add_argument("--drain", type=float, default=30.0, help="Seconds in-flight requests may finish.")
    parser.add_argument("--home", type=Path, default=None, help="TWINSERVE_HOME: restart a dead controller.")
    args = parser.parse_args(argv)
    configure_logging()
    run(
        args.endpoint,
        args.port,
        args.state,
        sync_interval=args.sync_interval,
        drain_s=args.drain,
        home=args.home,
    )


if __name__ == "__main__":
    main()
