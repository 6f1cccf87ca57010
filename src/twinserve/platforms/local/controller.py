"""An endpoint's controller: `python -m twinserve.platforms.local.controller --endpoint NAME`.

One detached process per endpoint (started by `create` before anything else, restarted by the
router or `endpoint reconcile`) does what SageMaker's control plane does for an endpoint in the
background, in two threads so that neither waits for the other:
- autoscaling: every `--interval` s it samples the router's load per variant (`/router/stats`)
  — and, for an async endpoint, the job service's backlog (`/async/stats`) — into the
  autoscaler's window and applies the policy's decision with `LocalPlatform.scale`, recording a
  ScalingEvent; cooldowns restart from the recorded events, so a restarted controller keeps them;
- reconciling: every `--reconcile-every` s it replaces dead replicas, restarts a dead router
  (even while a scale or an update holds the endpoint), and finishes or undoes an operation
  whose process died (a create the CLI started is finished: the CLI is only a client).
It scales only while the endpoint is InService and no other operation holds it. It works for the
endpoint only while the state names it (`controller_pid`: one controller per endpoint, and it
may be started before the endpoint is written); it exits when the endpoint is deleted, when
another controller is named, and on SIGTERM (it holds no requests: nothing to drain).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from twinserve.deploy.autoscale import Autoscaler, LoadSample
from twinserve.deploy.lease import utcnow
from twinserve.deploy.spec import Endpoint, EndpointStatus, ScalingEvent, traffic_group
from twinserve.deploy.state import StateStore
from twinserve.errors import ConflictError, NotFoundError, TwinserveError
from twinserve.platforms.local.daemons import configure_logging
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.router.client import RouterClient

log = logging.getLogger("twinserve.controller")

MODULE = "twinserve.platforms.local.controller"
_MAX_BACKOFF_S = 300.0
# a controller started before its endpoint is written (create) waits this long to be named in it
NAMED_WITHIN_S = 30.0


class Controller:
    """The control loop of one endpoint; `step()` is one tick (tests drive it directly)."""

    def __init__(
        self,
        manager: LocalPlatform,
        name: str,
        *,
        reconcile_every: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        pid: int | None = None,
    ) -> None:
        self.manager = manager
        self.name = name
        self.reconcile_every = reconcile_every
        self.clock = clock
        # the controller process's pid: it acts only while the endpoint names it (None: tests
        # driving `step` in their own process)
        self.pid = pid
        self._started = clock()
        self._named = False
        self._autoscaler: Autoscaler | None = None
        self._scaler_key: tuple[int, str] | None = None  # (generation, policy json) it was built for
        self._routed: dict[str, int] = {}  # last routed_total per traffic group
        self._next_reconcile = float("-inf")
        self._reconcile_failures = 0

    def step(self) -> bool:
        """One tick of both jobs (tests drive it); False once the endpoint is gone."""
        return self.reconcile_tick() and self.autoscale_tick()

    def current(self) -> Endpoint | None:
        """The endpoint, when this controller is the one in charge of it; None once it is gone
        or another controller is named (so this one exits). Before it is first named (it may be
        started before the endpoint is written), it waits up to NAMED_WITHIN_S."""
        try:
            endpoint = self.manager.store.get_endpoint(self.name)
        except NotFoundError:
            endpoint = None
        if self.pid is None or (endpoint is not None and endpoint.controller_pid == self.pid):
            self._named = endpoint is not None
            return endpoint
        if not self._named and self.clock() - self._started < NAMED_WITHIN_S:
            raise _NotYetNamed
        return None

    def reconcile_tick(self) -> bool:
        """Reconcile when it is due (backing off after failures); False once the endpoint is gone."""
        try:
            if self.current() is None:
                return False
        except _NotYetNamed:
            return True
        now = self.clock()
        if now < self._next_reconcile:
            return True
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
        return True

    def autoscale_tick(self) -> bool:
        """Sample the load and apply the policy's decision; False once the endpoint is gone."""
        try:
            endpoint = self.current()
        except _NotYetNamed:
            return True
        if endpoint is None:
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
            scaler = Autoscaler(policy, variants, clock=self.clock)
            if self._scaler_key is None:  # this process's first: the cooldowns go on from the events
                self._restore_cooldowns(scaler, self.manager.store.events(self.name, limit=50))
            self._autoscaler, self._scaler_key = scaler, key
        return self._autoscaler

    def _restore_cooldowns(self, scaler: Autoscaler, events: list[ScalingEvent]) -> None:
        """Cooldowns that survive a restart: each variant's last scaling (and last scale-out)
        from the recorded events, moved from wall-clock time onto this process's clock."""
        now_wall, now = utcnow(), self.clock()
        for variant in scaler.variants:
            mine = [e for e in events if e.variant == variant]
            last = mine[-1] if mine else None
            outs = [e for e in mine if e.to_replicas > e.from_replicas > 0]
            on_clock = {
                label: None if e is None else now - (now_wall - e.time).total_seconds()
                for label, e in (("scaling", last), ("out", outs[-1] if outs else None))
            }
            scaler.restore(variant, last_scaling=on_clock["scaling"], last_scale_out=on_clock["out"])

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


class _NotYetNamed(Exception):
    """The controller was started before its endpoint names it: wait, do nothing yet."""


def run(manager: LocalPlatform, name: str, *, interval: float = 1.0, reconcile_every: float = 2.0) -> None:
    """Autoscale (here) and reconcile (a thread) until the endpoint is deleted, another
    controller is named, or SIGTERM/SIGINT arrives."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller = Controller(manager, name, reconcile_every=reconcile_every, pid=os.getpid())
    log.info("controlling endpoint %r", name)
    reconciling = threading.Thread(
        target=_loop, args=(controller.reconcile_tick, min(interval, reconcile_every), stop), daemon=True
    )
    reconciling.start()
    _loop(controller.autoscale_tick, interval, stop)
    reconciling.join(timeout=30)
    log.info("no longer controlling endpoint %r; exiting", name)


def _loop(tick: Callable[[], bool], interval: float, stop: threading.Event) -> None:
    """Run `tick` every `interval` s until it returns False (then stop the other loop too)."""
    while not stop.is_set():
        try:
            if not tick():
                stop.set()
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
