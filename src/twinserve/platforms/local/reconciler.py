"""Reconciling an endpoint: make its processes match its state, after whatever happened.

Run every few seconds by the endpoint's controller and by `twinserve endpoint reconcile`
(after a crash or a reboot of the control plane). In order:
1. an operation whose process died is recovered: an unfinished create is finished (the CLI was
   only a client; if it cannot be, → Failed and stopped); an uncommitted update → rolled back;
   a delete → finished; a committed update, a scale → the steps below converge;
2. replicas of an old generation are retired;
3. a dead replica is replaced; a live one failing `/health` for 30 s (seen by repeated calls)
   is replaced;
4. each variant's live replicas are brought to its desired count;
5. a dead router is restarted on the same port (the URL stays), then a dead job service (async
   endpoints), and on request a dead controller.
A cheap read-only look comes first; the endpoint is taken (as operation "reconcile") only when
something needs doing, so a healthy endpoint costs a few probes and no writes. While a live
process holds the endpoint (a scale or an update, which may take minutes), only a dead router is
restarted beside it: the operation's own steps need it, and so do the endpoint's users.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from twinserve.deploy.spec import Endpoint, EndpointStatus, ReplicaRecord, ReplicaState
from twinserve.errors import BusyError, ModelLoadError, NotFoundError, PortTakenError
from twinserve.platforms.local.local_runtime import past_deadline
from twinserve.platforms.local.rollout import abandon_target
from twinserve.platforms.local.router.client import ROUTER_SEES_S
from twinserve.platforms.local.runtime import ReplicaStartError
from twinserve.server.process import wait_until_healthy

if TYPE_CHECKING:
    from twinserve.platforms.local.platform import LocalPlatform, Progress

UNHEALTHY_GRACE_S = 30.0  # a live replica failing /health this long is replaced
BRING_UP_PASSES = 3  # a create replaces processes killed while it starts this many times
LIVE = (ReplicaState.STARTING, ReplicaState.HEALTHY, ReplicaState.UNHEALTHY)


class Reconciler:
    """Reconciles one manager's endpoints; remembers since when a replica has been unhealthy."""

    def __init__(self, manager: LocalPlatform) -> None:
        self.manager = manager
        self._unhealthy_since: dict[str, float] = {}

    def reconcile(self, name: str, *, ensure_controller: bool = False, progress: Progress) -> list[str]:
        """Make the processes match the state; returns what it did, in words.

        Recovers an operation whose process died, retires replicas of stale generations,
        replaces dead replicas (and live ones failing `/health` for 30 s, when called
        repeatedly by the controller), starts or stops replicas to meet the desired counts,
        restarts a dead router on the same URL and, with `ensure_controller`, a dead controller.
        """
        actions: list[str] = []

        def did(message: str) -> None:
            actions.append(message)
            progress(message)

        ep = self.manager.store.get_endpoint(name)
        if ep.operation is not None:
            if ep.operation_holder is not None and ep.operation_holder.alive():
                self._router_beside(ep, did)  # someone is working on it: only the router
                return actions
            self.recover(name, progress=did)
            try:
                ep = self.manager.store.get_endpoint(name)
            except NotFoundError:
                return actions
        if ep.status is not EndpointStatus.IN_SERVICE:
            return actions
        if not self._needs_reconcile(ep, ensure_controller):
            return actions  # the common case: probed, nothing written
        try:
            ep = self.manager.store.begin_operation(name, "reconcile")
        except BusyError:
            return actions
        try:
            orphans = self.manager.runtime.sweep_orphans(name)
            if orphans:
                did(
                    f"stopped {len(orphans)} replica process(es) without a record (pid {', '.join(map(str, orphans))})"
                )
            # the router first: while it is down the endpoint's URL answers nothing, even with
            # healthy replicas behind it, and replacing a replica takes a model load
            if self.manager.restart_router(name):
                did("the router was down; restarted it on the same URL")
            self._reconcile_replicas(self.manager.store.get_endpoint(name), did)
            ep = self.manager.store.get_endpoint(name)
            if not self.manager.job_service.alive(ep):
                did("the job service was down; restarting it")
                self.manager.start_job_service(ep)
            if ensure_controller and not self.manager.controller_alive(ep):
                did("the controller was down; restarting it")
                self.manager.start_controller(name)
        except Exception as exc:
            # a router that cannot have its URL back leaves the endpoint unreachable: Failed, said why
            status = EndpointStatus.FAILED if isinstance(exc, PortTakenError) else EndpointStatus.IN_SERVICE
            with contextlib.suppress(NotFoundError):
                self.manager.store.end_operation(name, status, reason=f"reconcile failed: {exc}")
            raise
        self.manager.store.end_operation(name, EndpointStatus.IN_SERVICE)
        return actions

    def _needs_reconcile(self, ep: Endpoint, ensure_controller: bool) -> bool:
        """A read-only look (probes, no writes): is any replica, the router or the controller off?"""
        replicas = self.manager.runtime.find_replicas(ep.name)
        now = time.monotonic()
        for r in replicas:
            if r.generation != ep.generation or _dead(r) or _start_overdue(r) or _drain_abandoned(r):
                return True
            if r.state is ReplicaState.UNHEALTHY:
                if now - self._unhealthy_since.setdefault(r.id, now) >= UNHEALTHY_GRACE_S:
                    return True
            else:
                self._unhealthy_since.pop(r.id, None)
        for v in ep.config.variants:
            if sum(r.variant == v.name and r.state in LIVE for r in replicas) != ep.desired(v.name):
                return True
        if ensure_controller and not self.manager.controller_alive(ep):
            return True
        if not self.manager.router_alive(ep) or not self.manager.job_service.alive(ep):
            return True
        return bool(self.manager.runtime.find_orphans(ep.name))

    def _router_beside(self, ep: Endpoint, did: Progress) -> None:
        """Restart a dead router while an update or a scale holds the endpoint (not a create or
        a delete: those start and stop it themselves)."""
        if ep.status not in (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING, EndpointStatus.ROLLING_BACK):
            return
        if self.manager.router_alive(ep):
            return
        try:
            if self.manager.restart_router(ep.name):
                did(f"the router was down; restarted it on the same URL beside the running {ep.operation}")
        except PortTakenError as exc:  # once the operation ends, a full reconcile fails the endpoint
            did(f"the router could not be restarted beside the {ep.operation}: {exc}")

    def recover(self, name: str, *, progress: Progress) -> bool:
        """Take over and finish or undo an operation whose process died; False when there is
        none (or another process took it over first)."""
        ep = self.manager.store.get_endpoint(name)
        holder = ep.operation_holder
        if ep.operation is None or (holder is not None and holder.alive()):
            return False
        try:
            self.manager.store.take_over(name, holder)
        except BusyError:
            return False
        who = holder.describe() if holder is not None else "its process"
        self._recover(ep, who, progress)
        return True

    def _recover(self, ep: Endpoint, who: str, did: Progress) -> None:
        name, op = ep.name, ep.operation
        did(f"recovering an interrupted {op} ({who} is gone)")
        if op == "create":
            self._finish_create(name, who, did)
        elif op == "delete":
            self.manager.delete(name)
        elif op == "update" and ep.target is not None:  # not committed: back to the serving generation
            abandon_target(self.manager, name, "the update was interrupted; rolled back")
        else:  # a committed update, a scale, a reconcile: the next steps converge
            self.manager.store.end_operation(name, EndpointStatus.IN_SERVICE)

    def _finish_create(self, name: str, who: str, did: Progress) -> None:
        """Bring up what the dead creator had not (keeping the replicas it started); if that
        fails, stop everything and leave the endpoint Failed, as a failed create does."""
        ep = self.manager.store.get_endpoint(name)
        try:
            self.bring_up(name, controller=ep.controller_pid is not None, progress=did)
        except Exception as exc:
            did(f"the create could not be finished: {exc}")
            self.manager.stop_all(name, ep.config.drain_timeout_s)
            with contextlib.suppress(NotFoundError):
                self.manager.store.end_operation(
                    name, EndpointStatus.FAILED, reason=f"the create was interrupted ({who} stopped): {exc}"
                )
            raise
        self.manager.store.end_operation(name, EndpointStatus.IN_SERVICE, clear_failure=True)
        did(f"finished the create: endpoint {name!r} is InService")

    def bring_up(self, name: str, *, controller: bool, progress: Progress) -> None:
        """Everything a Creating endpoint needs, started where missing: its replicas (dead ones
        replaced), router, job service and controller, until the router serves a replica.

        Each pass only adds what is missing, so a process killed meanwhile (by a signal, not by
        its own failure) is replaced on the next pass, up to BRING_UP_PASSES; a replica whose
        model fails to load fails at once."""
        for attempt in range(1, BRING_UP_PASSES + 1):
            try:
                self._bring_up_once(name, controller, progress)
                return
            except ReplicaStartError as exc:
                if not exc.killed or attempt == BRING_UP_PASSES:
                    raise
                progress(f"a replica was killed while it started; pass {attempt + 1}")
            except ModelLoadError as exc:  # the router died, or no replica is routed: replace, retry
                if attempt == BRING_UP_PASSES:
                    raise
                progress(f"not serving yet ({str(exc).splitlines()[0]}); pass {attempt + 1}")

    def _bring_up_once(self, name: str, controller: bool, progress: Progress) -> None:
        self.manager.runtime.sweep_orphans(name)
        self._reconcile_replicas(self.manager.store.get_endpoint(name), progress)
        progress("starting the router")
        self.manager.restart_router(name)
        ep = self.manager.store.get_endpoint(name)
        if ep.config.async_inference is not None and not self.manager.job_service.alive(ep):
            progress("starting the job service (async invocations)")
            self.manager.start_job_service(ep)
        if controller and not self.manager.controller_alive(ep):
            self.manager.start_controller(name)  # killed meanwhile, or `create` ran without one
        ep = self.manager.store.get_endpoint(name)
        needs_replica = any(ep.desired(v.name) for v in ep.config.variants)
        if ep.url is None or not wait_until_healthy(
            ep.url, ROUTER_SEES_S, path="/health" if needs_replica else "/router/live"
        ):
            raise ModelLoadError(f"the router had no healthy replica after {ROUTER_SEES_S:.0f}s")
        progress("router is up")

    def _reconcile_replicas(self, ep: Endpoint, did: Progress) -> None:
        name = ep.name
        replicas = self.manager.runtime.find_replicas(name)
        # stopped ones too: their records (an update cut during its commit) would stay for ever
        stale = [r for r in replicas if r.generation != ep.generation]
        if stale:
            did(f"retiring {len(stale)} replica(s) of an old generation")
            self.manager.retire(name, stale, ep.config.drain_timeout_s)
        now = time.monotonic()
        for record in replicas:
            if record.generation != ep.generation:
                continue
            if _drain_abandoned(record):
                did(f"replica {record.id} was left draining; stopping it")
                self.manager.runtime.stop_replica(record, 0)  # out of the router since it was marked
            elif _dead(record):
                did(f"replica {record.id} died; replacing it")
                self.manager.runtime.stop_replica(record, 0)  # forgets it (and reaps it if it was our child)
            elif _start_overdue(record):
                did(f"replica {record.id} was not healthy by its start deadline; replacing it")
                self.manager.retire(name, [record], 0)
            elif record.state is ReplicaState.UNHEALTHY:
                since = self._unhealthy_since.setdefault(record.id, now)
                if now - since >= UNHEALTHY_GRACE_S:
                    did(f"replica {record.id} failed /health for {now - since:.0f}s; replacing it")
                    self._unhealthy_since.pop(record.id, None)
                    # alive: out of the router first, in-flight requests may finish
                    self.manager.retire(name, [record], ep.config.drain_timeout_s)
            else:
                self._unhealthy_since.pop(record.id, None)
        remaining = self.manager.store.replicas(name)  # after the removals above; probed just now
        for v in ep.config.variants:
            desired = ep.desired(v.name)
            live = [
                r
                for r in remaining
                if r.variant == v.name and r.generation == ep.generation and r.state in LIVE
            ]
            if len(live) != desired:
                did(f"{v.name}: {len(live)} live replica(s), {desired} desired")
                self.manager.converge(name, v.name, desired, ep, did)


def _dead(record: ReplicaRecord) -> bool:
    """Stopped, or recorded without a process: whoever was starting it no longer holds the
    endpoint (reconcile runs only then), so no process will ever be attached to it."""
    return record.state is ReplicaState.STOPPED or (
        record.pid is None and record.state is not ReplicaState.DRAINING
    )


def _drain_abandoned(record: ReplicaRecord) -> bool:
    """Marked draining by an operation that is gone (reconcile runs only when none holds the
    endpoint): the process it was retiring would otherwise run on, unrouted, for ever."""
    return record.state is ReplicaState.DRAINING


def _start_overdue(record: ReplicaRecord) -> bool:
    return record.state is ReplicaState.STARTING and past_deadline(record)
