"""An endpoint's controller: `python -m twinserve.platforms.local.controller --endpoint NAME`.

One detached process per endpoint (started by `create`, restarted by `endpoint reconcile`)
does what SageMaker's control plane does for an endpoint in the background:
- every `--interval` s it samples the router's load per variant (`/router/stats`) — and, for
  an async endpoint, the job service's backlog (`/async/stats`) — into the autoscaler's window and applies the policy's decision with `LocalPlatform.scale`,
  recording a ScalingEvent;
- every `--reconcile-every` s it reconciles: replaces dead replicas, restarts a dead router,
  recovers an operation whose process died.
It acts only while the endpoint is InService and no other operation holds it; it exits when
the endpoint is deleted, and on SIGTERM (it holds no requests: nothing to drain).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from twinserve.deploy.autoscale import Autoscaler, LoadSample
from twinserve.deploy.spec import Endpoint, EndpointStatus, traffic_group
from twinserve.deploy.state import StateStore
from twinserve.errors import ConflictError, NotFoundError, TwinserveError
from twinserve.platforms.local.daemons import configure_logging
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.router.client import RouterClient

log = logging.getLogger("twinserve.controller")

MODULE = "twinserve.platforms.local.controller"
_MAX_BACKOFF_S = 300.0


class Controller:
    """The control loop of one endpoint; `step()` is one tick (tests drive it directly)."""

    def __init__(
        self,
        manager: LocalPlatform,
        name: str,
        *,
        reconcile_every: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.name = name
        self.reconcile_every = reconcile_every
        self.clock = clock
        self._autoscaler: Autoscaler | None = None
        self._scaler_key: tuple[int, str] | None = None  # (generation, policy json) it was built for
        self._routed: dict[str, int] = {}  # last routed_total per traffic group
        self._next_reconcile = float("-inf")
        self._reconcile_failures = 0

    def step(self) -> bool:
        """One tick; False once the endpoint is gone (the loop ends)."""
        try:
            endpoint = self.manager.store.get_endpoint(self.name)
        except NotFoundError:
            return False
        now = self.clock()
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.reconcile_every
            try:
                self.manager.reconcile(self.name, progress=lambda action: log.info("reconcile: %s", action))
                self._reconcile_failures = 0
            except NotFoundError:
                return False
            except Exception:
                # e.g. a replacement that crashes at start: back off (4, 8, 16 … 300 s), no tight loop
                self._reconcile_failures += 1
                delay = min(_MAX_BACKOFF_S, self.reconcile_every * 2**self._reconcile_failures)
                self._next_reconcile = now + delay
                log.exception("reconcile failed; next try in %.0fs", delay)
            try:
                endpoint = self.manager.store.get_endpoint(self.name)
            except NotFoundError:
                return False
        if endpoint.status is EndpointStatus.IN_SERVICE and endpoint.operation is None:
            self._autoscale(endpoint)
        return True

    def _scaler(self, endpoint: Endpoint) -> Autoscaler | None:
        policy = endpoint.config.autoscaling
        if policy is None:
            return None
        key = (endpoint.generation, policy.model_dump_json())
        if self._scaler_key != key:  # a new config: its own window and cooldowns
            variants = [v.name for v in endpoint.config.variants]
            self._autoscaler = Autoscaler(policy, variants, clock=self.clock)
            self._scaler_key = key
        return self._autoscaler

    def _autoscale(self, endpoint: Endpoint) -> None:
        scaler = self._scaler(endpoint)
        if scaler is None or endpoint.url is None:
            return
        try:
            stats = RouterClient(endpoint).stats()
            backlog = self._backlog(endpoint)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("no load sample (router or job service: %s)", exc)
            return
        now = self.clock()
        for variant in endpoint.config.variants:
            group = traffic_group(variant.name, endpoint.generation)
            s = stats.get(group)
            if s is None and backlog is None:
                continue
            routed = s.routed_total if s is not None else self._routed.get(group, 0)
            last = self._routed.get(group, routed)
            self._routed[group] = routed
            sample = LoadSample(
                time=now,
                replicas=s.replicas if s is not None else 0,  # scaled to zero: no group in the router
                in_flight=s.in_flight if s is not None else 0,
                invocations=max(0, routed - last),
                backlog=backlog or 0,
            )
            scaler.observe(variant.name, sample)
            decision = scaler.decide(variant.name, endpoint.desired(variant.name))
            if decision is None:
                continue
            log.info("autoscaling %s: %s", variant.name, decision.reason)
            try:
                self.manager.scale(
                    self.name, decision.to_replicas, variant=variant.name, event=decision.to_event(self.name)
                )
            except ConflictError as exc:
                log.info("not scaling now: %s", exc)
                continue
            except TwinserveError as exc:
                log.error("scaling failed: %s", exc)
            scaler.scaled(variant.name, decision)
            return  # the endpoint changed: read it again next tick

    @staticmethod
    def _backlog(endpoint: Endpoint) -> int | None:
        """Jobs queued or running (async endpoints), from the job service; None for real-time."""
        if endpoint.config.async_inference is None:
            return None
        if endpoint.async_url is None:
            raise ValueError("the job service has no URL yet")
        response = httpx.get(f"{endpoint.async_url}/async/stats", timeout=5.0)
        response.raise_for_status()
        return int(response.json()["backlog"])


def run(manager: LocalPlatform, name: str, *, interval: float = 1.0, reconcile_every: float = 2.0) -> None:
    """Tick until the endpoint is deleted or SIGTERM/SIGINT arrives."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller = Controller(manager, name, reconcile_every=reconcile_every)
    log.info("controlling endpoint %r", name)
    while not stop.is_set():
        try:
            if not controller.step():
                log.info("endpoint %r is gone; exiting", name)
                return
        except Exception:  # one bad tick (a store hiccup) must not end the control loop
            log.exception("control step failed")
        stop.wait(interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="Endpoint name in the state store.")
    parser.add_argument("--state", type=Path, required=True, help="State store file.")
    parser.add_argument("--home", type=Path, required=True, help="twinserve home (replica logs).")
    parser.add_argument("--interval", type=float, default=1.0, help="Seconds between load samples.")
    parser.add_argument("--reconcile-every", type=float, default=2.0, help="Seconds between reconciles.")
    args = parser.parse_args(argv)
    configure_logging()
    store = StateStore(args.state)
    manager = LocalPlatform(store, LocalRuntime(store, home=args.home))
    run(manager, args.endpoint, interval=args.interval, reconcile_every=args.reconcile_every)


if __name__ == "__main__":
    main()
