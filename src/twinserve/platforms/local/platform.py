"""The control plane of real-time endpoints on one machine.

```
create:    controller ─► Creating ─► replicas (healthy) ─► router ─► [job service] ─► InService
           any failure (Ctrl-C included) ─► stop what was started ─► Failed (reason: the
           replica's log tail) ─► raise; the CLI killed ─► the controller finishes the create
update:    Updating ─► green replicas (generation N+1) healthy in the router ─► traffic to green in
           steps (canary %, bake) ─► commit ─► blue drained and stopped ─► InService
           green fails to start, dies or errors while baking ─► RollingBack ─► green stopped ─►
           InService on blue, reason recorded ─► raise UpdateRolledBackError
scale:     Updating ─► start (or drain and stop) replicas of one variant ─► event ─► InService
reconcile: recover an interrupted operation, retire stale generations, replace dead replicas,
           meet desired counts, restart a dead router (same URL) and controller
delete:    Deleting ─► router (drains), every replica (drains) ─► state forgotten ─► controller
           (it stays to the end: if the CLI dies, the controller finishes the delete)
```
Everything lives in processes that outlive the caller, so any later CLI process (or the
endpoint's controller) acts from the state store alone. One operation holds an endpoint at a
time (`StateStore.begin_operation`); an operation whose process died is recovered by
`reconcile`, which the controller runs every few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twinserve.client.transport import Transport
from twinserve.deploy.lease import OperationHolder
from twinserve.deploy.pinning import pin_config
from twinserve.deploy.platform import Capabilities
from twinserve.deploy.platform_config import PlatformName
from twinserve.deploy.policies import AutoscalingPolicy
from twinserve.deploy.spec import (
    Endpoint,
    EndpointConfig,
    EndpointStatus,
    ReplicaRecord,
    ReplicaState,
    ScalingEvent,
    VariantConfig,
    VariantState,
)
from twinserve.deploy.state import StateStore
from twinserve.errors import (
    BusyError,
    ConflictError,
    InterruptedOperationError,
    ModelLoadError,
    NotFoundError,
    ValidationError,
)
from twinserve.platforms.local.daemons import Daemon
from twinserve.platforms.local.gateway import GatewayStartError, ensure_gateway, gateway_url, stop_gateway
from twinserve.platforms.local.job_service import LOG as JOB_SERVICE_LOG
from twinserve.platforms.local.job_service import JobService
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.ports import reclaim_port
from twinserve.platforms.local.reconciler import LIVE, Reconciler
from twinserve.platforms.local.router.client import ROUTER_SEES_S, RouterClient
from twinserve.platforms.local.router.process import MODULE as ROUTER_MODULE
from twinserve.server.process import is_healthy, tail_lines, wait_until_healthy

Progress = Callable[[str], None]

CONTROLLER_MODULE = "twinserve.platforms.local.controller"
ROUTER_LOG = "router.log"
CONTROLLER_LOG = "controller.log"
PROVISION_LOG = "control.log"
_ROUTER_START_TIMEOUT_S = 60.0
# a restarted router waits this long for its old port (the endpoint's URL) before failing
_ROUTER_PORT_WAIT_S = 15.0
_EXIT_GRACE_S = 10.0
# a delete waits this long for the operation it displaced to notice and stop starting replicas
_DISPLACED_WAIT_S = 15.0
_BUSY_WAIT_S = 120.0  # a user's update/scale waits this long for a running operation to end


def _quiet(_: str) -> None:
    """The default progress callback: say nothing."""


class LocalPlatform:
    """Create, update, scale, reconcile and delete local endpoints; state in a `StateStore`.

    `delete` of a missing endpoint is not an error (it returns False): deleting is idempotent,
    so a retried or concurrent delete never fails.
    """

    name: PlatformName = "local"
    capabilities = Capabilities(
        native_routing=False,  # our router
        native_autoscaling=False,  # our controller
        traffic_shifting=frozenset({"weights", "canary"}),
        scale_to_zero=True,  # async endpoints: the queue holds jobs while no replica runs
        runtime_api=True,  # through the local SageMaker Runtime gateway
    )

    def __init__(self, store: StateStore | None = None, runtime: LocalRuntime | None = None) -> None:
        self.store = store or (runtime.store if runtime is not None else StateStore())
        self.runtime = runtime or LocalRuntime(self.store, home=self.store.path.parent.parent)
        self.router = Daemon(ROUTER_MODULE, ROUTER_LOG)
        self.controller = Daemon(CONTROLLER_MODULE, CONTROLLER_LOG)
        self.job_service = JobService(self.store, self.home)
        self._reconciler = Reconciler(self)

    def endpoint_dir(self, name: str) -> Path:
        return self.runtime.logs_root / name

    @property
    def home(self) -> Path:
        return self.runtime.logs_root.parent

    # ------------------------------------------------------------ create
    def create(
        self,
        config: EndpointConfig,
        *,
        wait: bool = True,
        controller: bool = True,
        progress: Progress = _quiet,
    ) -> Endpoint:
        """Create the endpoint; with `wait`, return it InService (or raise, leaving it Failed).

        ConflictError if the name exists. Without `wait`, return it Creating while a detached
        process starts it (follow with `describe`). `controller=False` runs no controller
        (no autoscaling, no replacement of dead replicas): for tests and one-shot jobs.
        """
        if config.platform.type != self.name:
            raise ValidationError(
                f"endpoint {config.name!r} is for platform {config.platform.type!r}, not local"
            )
        with contextlib.suppress(NotFoundError):  # refused before anything starts (put_endpoint rechecks)
            self.store.get_endpoint(config.name)
            raise ConflictError(f"endpoint {config.name!r} already exists")
        config = pin_config(config, progress)  # before anything is recorded: an unknown alias is a 404
        # the controller first: from the moment the endpoint exists something supervises it, and
        # finishes the create if this process dies (it waits to be named in the new record)
        supervisor = (
            self.controller.start(config.name, self._controller_args(), self.endpoint_dir(config.name))
            if controller
            else None
        )
        new = Endpoint.new(config).model_copy(
            update={
                "operation": "create",
                "operation_holder": OperationHolder.this_process(),
                "controller_pid": supervisor.pid if supervisor else None,
            }
        )
        try:
            self.store.put_endpoint(new)
        except BaseException:
            if supervisor is not None:
                self.controller.stop(config.name, supervisor.pid, _EXIT_GRACE_S)
            raise
        progress(f"endpoint {config.name!r} is Creating")
        if not wait:
            self._provision_detached(config.name, controller)
            return self.store.get_endpoint(config.name)
        return self.provision(config.name, controller=controller, progress=progress)

    def provision(self, name: str, *, controller: bool = True, progress: Progress = _quiet) -> Endpoint:
        """Start the replicas, router and controller of a Creating endpoint; InService, or Failed and raise."""
        endpoint = self.store.begin_operation(name, "create", force=True)  # this process takes over
        config = endpoint.config
        try:
            self.start_replicas(config, [(v, v.replicas) for v in config.variants], 1, progress)
            self._reconciler.bring_up(name, controller=controller, progress=progress)
        except BaseException as exc:  # Ctrl-C included: nothing may be left running
            reason = str(exc) or type(exc).__name__
            progress("start-up failed; stopping what was started")
            self.stop_all(name, config.drain_timeout_s)
            with contextlib.suppress(NotFoundError):
                self.store.end_operation(name, EndpointStatus.FAILED, reason=reason)
            raise
        self.store.end_operation(name, EndpointStatus.IN_SERVICE, clear_failure=True)
        progress(f"endpoint {name!r} is InService")
        self._ensure_gateway(progress)
        return self.describe(name)

    def _ensure_gateway(self, progress: Progress) -> None:
        """The SageMaker Runtime API for every local endpoint, on one port (started once)."""
        try:
            url = ensure_gateway(self.store, self.home)  # idempotent: a ping when it already runs
        except GatewayStartError as exc:  # the endpoint still serves over HTTP
            progress(f"the SageMaker Runtime gateway did not start: {exc}")
            return
        progress(f'SageMaker Runtime API: boto3.client("sagemaker-runtime", endpoint_url="{url}")')

    def runtime_api_url(self) -> str | None:
        """The local SageMaker Runtime gateway's URL, when it runs."""
        return gateway_url(self.home)

    def start_replicas(
        self,
        config: EndpointConfig,
        counts: Iterable[tuple[VariantConfig, int]],
        generation: int,
        progress: Progress,
    ) -> list[ReplicaRecord]:
        """Start replicas in parallel and wait for all; raise the first failure (after all settled)."""
        jobs = [v for v, n in counts for _ in range(n)]
        if not jobs:
            return []
        progress(f"starting {len(jobs)} replica(s) of generation {generation}")
        started: list[ReplicaRecord] = []
        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="replica-start") as pool:
            futures = [
                pool.submit(self.runtime.start_replica, config, v, generation=generation) for v in jobs
            ]
            for future in futures:  # wait for all: a replica still starting must not be orphaned
                try:
                    record = future.result()
                    started.append(record)
                    progress(f"replica {record.id} is healthy ({record.url}, {record.model_version or '?'})")
                except BaseException as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]
        return started

    def _provision_detached(self, name: str, controller: bool) -> None:
        self._detached(name, "provision", [] if controller else ["--no-controller"])

    def update_detached(
        self, name: str, target: EndpointConfig, *, canary_percent: Iterable[float] = (), bake_s: float = 0.0
    ) -> None:
        """`update` in a detached process (`endpoint update --no-wait`); follow with `describe`.

        The target goes through a pipe, not argv or a file: it may hold the API key."""
        args = [f"--canary={p:g}" for p in canary_percent] + [f"--bake={bake_s:g}"]
        proc = self._detached(name, "update", args, stdin=subprocess.PIPE)
        assert proc.stdin is not None
        with proc.stdin:
            proc.stdin.write(json.dumps(target.to_dict(reveal_secrets=True)).encode())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # return once it holds the endpoint (or failed to)
            if self.store.get_endpoint(name).operation == "update":
                return
            if proc.poll() is not None:
                log_tail = tail_lines(self.endpoint_dir(name) / PROVISION_LOG, 5)
                raise BusyError(f"the update did not start:\n{log_tail}")
            time.sleep(0.1)

    def _detached(
        self, name: str, command: str, args: list[str], stdin: int | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.endpoint_dir(name) / PROVISION_LOG
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", __name__, command, name, "--state", str(self.store.path)]
        cmd += ["--home", str(self.home), *args]
        with log_path.open("ab") as out:
            return subprocess.Popen(
                cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    # ------------------------------------------------------------ router and controller processes
    def _start_router(self, endpoint: Endpoint) -> None:
        """Start the router on the port of its recorded URL when that is free (the URL is stable)
        and wait until it serves (`/router/live`); whether it routes to a replica is for the
        caller to wait for (`Reconciler.bring_up`)."""
        port = reclaim_port(endpoint.url, _ROUTER_PORT_WAIT_S, required=True)
        name, drain = endpoint.name, endpoint.config.drain_timeout_s
        args = ["--port", str(port), "--state", str(self.store.path), "--drain", f"{drain:g}"]
        args += ["--home", str(self.home)]  # so it can restart the controller
        url = f"http://127.0.0.1:{port}"
        proc = self.router.start_recorded(
            name,
            args,
            self.endpoint_dir(name),
            lambda started: self.store.update_endpoint(
                name, lambda ep: ep.model_copy(update={"url": url, "router_pid": started.pid})
            ),
        )
        gone = lambda: proc.poll() is not None  # noqa: E731
        if wait_until_healthy(url, _ROUTER_START_TIMEOUT_S, gone=gone, path="/router/live"):
            return
        log_tail = tail_lines(self.endpoint_dir(name) / ROUTER_LOG, 20)
        if proc.poll() is not None:
            raise ModelLoadError(f"the router exited with {proc.returncode}:\n{log_tail}")
        raise ModelLoadError(f"the router did not serve after {_ROUTER_START_TIMEOUT_S:.0f}s:\n{log_tail}")

    def supervise_controller(self, name: str) -> bool:
        """Restart the endpoint's controller if one was started and has died (the router runs
        this, as the controller restarts a dead router); True if it did. Only an InService
        endpoint no operation holds: a delete stops the controller on purpose."""
        ep = self.store.get_endpoint(name)
        if (
            ep.status is not EndpointStatus.IN_SERVICE
            or ep.operation is not None
            or ep.controller_pid is None
            or self.controller_alive(ep)
        ):
            return False
        try:
            self.store.begin_operation(name, "supervise")
        except ConflictError:  # busy, or interrupted: the next look (or reconcile) deals with it
            return False
        try:
            if self.controller_alive(self.store.get_endpoint(name)):
                return False
            self.start_controller(name)
            return True
        finally:
            self.store.end_operation(name, EndpointStatus.IN_SERVICE)

    def restart_router(self, name: str) -> bool:
        """Start the router if it is down; True if it was. One start at a time across processes
        (a file lock): the controller may do it beside an operation, which may too. It returns
        once the router serves (`/router/live`), whether or not a replica is routed yet."""
        lock = self.endpoint_dir(name) / "router.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # released when this process dies, too
            endpoint = self.store.get_endpoint(name)
            if self.router_alive(endpoint):
                return False
            self._start_router(endpoint)
            return True

    def start_controller(self, name: str) -> None:
        self.controller.start_recorded(
            name,
            self._controller_args(),
            self.endpoint_dir(name),
            lambda started: self.store.update_endpoint(
                name, lambda ep: ep.model_copy(update={"controller_pid": started.pid})
            ),
        )

    def _controller_args(self) -> list[str]:
        return ["--state", str(self.store.path), "--home", str(self.home)]

    def start_job_service(self, endpoint: Endpoint) -> None:
        """Start an async endpoint's job service (see `platforms.local.job_service`)."""
        self.job_service.start(endpoint, self.endpoint_dir(endpoint.name))

    def router_alive(self, endpoint: Endpoint) -> bool:
        """The recorded router process is running and serves (`/router/live`, replicas or not)."""
        return (
            endpoint.url is not None
            and self.router.is_ours(endpoint.router_pid, endpoint.name)
            and is_healthy(endpoint.url, path="/router/live")
        )

    def controller_alive(self, endpoint: Endpoint) -> bool:
        return self.controller.is_ours(endpoint.controller_pid, endpoint.name)

    # ------------------------------------------------------------ read
    def describe(self, name: str) -> Endpoint:
        """The endpoint with its replicas' states probed now and current replica counts; NotFoundError."""
        endpoint = self.store.get_endpoint(name)
        replicas = self.runtime.find_replicas(name)
        variants = [
            v.model_copy(
                update={
                    "current_replicas": sum(
                        r.variant == v.name and r.generation == endpoint.generation and r.state.serves
                        for r in replicas
                    )
                }
            )
            for v in endpoint.variants
        ]
        return endpoint.model_copy(update={"replicas": replicas, "variants": variants})

    def list_endpoints(self) -> list[Endpoint]:
        """Every local endpoint, described (replicas probed now)."""
        found = []
        for endpoint in self.store.list_endpoints():
            if endpoint.config.platform.type != self.name:
                continue
            with contextlib.suppress(NotFoundError):  # deleted while we looked
                found.append(self.describe(endpoint.name))
        return found

    def events(self, name: str, limit: int | None = 20) -> list[ScalingEvent]:
        self.store.get_endpoint(name)  # NotFoundError
        return self.store.events(name, limit=limit)

    def logs(self, name: str, lines: int = 50) -> dict[str, str]:
        """The last `lines` of each replica's log, the router's, the controller's; NotFoundError."""
        endpoint = self.store.get_endpoint(name)
        out = {r.id: self.runtime.replica_logs(r, lines) for r in endpoint.replicas}
        for label, file in (
            ("router", ROUTER_LOG),
            ("jobs", JOB_SERVICE_LOG),
            ("controller", CONTROLLER_LOG),
            ("control", PROVISION_LOG),
        ):
            path = self.endpoint_dir(name) / file
            if path.exists():
                out[label] = tail_lines(path, lines)
        return out

    def begin(
        self,
        name: str,
        operation: str,
        status: EndpointStatus,
        allowed: Callable[[Endpoint], str | None],
        wait_s: float = _BUSY_WAIT_S,
    ) -> Endpoint:
        """Take the endpoint, waiting up to `wait_s` while another operation (e.g. the
        controller's reconcile or an autoscaling step) holds it; one whose process died is
        recovered at once, not waited for."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.store.begin_operation(name, operation, status, allowed=allowed)
            except InterruptedOperationError:
                self._reconciler.recover(name, progress=_quiet)
            except BusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    # ------------------------------------------------------------ update (blue/green)
    def update(
        self,
        name: str,
        target: EndpointConfig,
        *,
        canary_percent: Iterable[float] = (),
        bake_s: float = 0.0,
        progress: Progress = _quiet,
    ) -> Endpoint:
        """Blue/green to `target` with no request dropped; see `rollout.update`."""
        from twinserve.platforms.local.rollout import update

        return update(self, name, target, canary_percent=canary_percent, bake_s=bake_s, progress=progress)

    def config_with_model(self, name: str, model: str, *, variant: str | None = None) -> EndpointConfig:
        """See `Endpoint.config_with_model`."""
        return self.store.get_endpoint(name).config_with_model(model, variant=variant)

    # ------------------------------------------------------------ scale
    def scale(
        self,
        name: str,
        replicas: int,
        *,
        variant: str | None = None,
        event: ScalingEvent | None = None,
        progress: Progress = _quiet,
    ) -> Endpoint:
        """Set a variant's replica count (start, or drain and stop the newest) and record the event.

        A manual scale must stay within the autoscaling bounds (ValidationError). ConflictError
        while another operation runs. If new replicas fail to start the endpoint stays InService
        on the ones it has, with the reason recorded, and the error is raised.
        """
        ep = self.store.get_endpoint(name)
        v = ep.config.variant(variant) if variant else ep.config.variants[0]
        if replicas < (0 if ep.config.async_inference is not None else 1):
            raise ValidationError(
                f"{replicas} replicas: a real-time endpoint needs at least 1 (0 is for async)"
            )
        policy = ep.config.autoscaling
        scaled = event is None and policy is not None and policy.variant in (None, v.name)
        if scaled and policy is not None and not policy.min_replicas <= replicas <= policy.max_replicas:
            raise ValidationError(
                f"{replicas} replicas is outside the autoscaling bounds "
                f"{policy.min_replicas}..{policy.max_replicas} of {name!r}"
            )
        ep = self.begin(
            name, "scale", EndpointStatus.UPDATING, _can_scale, wait_s=0 if event else _BUSY_WAIT_S
        )
        before = ep.desired(v.name)
        self._set_desired(name, v.name, replicas)
        self.store.record_event(
            event
            or ScalingEvent(
                endpoint=name,
                variant=v.name,
                from_replicas=before,
                to_replicas=replicas,
                reason="manual scale",
            )
        )
        progress(f"scaling {name}/{v.name}: {before} → {replicas}")
        try:
            self.converge(name, v.name, replicas, ep, progress)
        except Exception as exc:
            self.store.end_operation(
                name, EndpointStatus.IN_SERVICE, reason=f"scaling to {replicas} failed: {exc}"
            )
            raise
        self.store.end_operation(name, EndpointStatus.IN_SERVICE)
        progress(f"endpoint {name!r} is InService")
        return self.describe(name)

    # ------------------------------------------------------------ autoscaling
    def set_autoscaling(
        self, name: str, policy: AutoscalingPolicy | None, *, progress: Progress = _quiet
    ) -> Endpoint:
        """Replace the endpoint's policy (None: fixed counts). The controller reads it on its next
        tick, with a fresh window and cooldowns, and moves a count outside the new bounds into them."""
        ep = self.begin(name, "autoscaling", EndpointStatus.UPDATING, _can_scale)
        try:
            config = ep.config_with_policy(policy)
            self.store.update_endpoint(name, lambda e: e.model_copy(update={"config": config}))
            if policy is not None and not self.controller_alive(self.store.get_endpoint(name)):
                self.start_controller(name)
        finally:
            self.store.end_operation(name, EndpointStatus.IN_SERVICE)
        progress(f"endpoint {name!r}: autoscaling {'set' if policy else 'off'}")
        return self.describe(name)

    def transport(self, endpoint: Endpoint) -> Transport:
        """HTTP to the endpoint's router URL, with its API key."""
        from twinserve.client.transport import HttpTransport

        if endpoint.url is None:
            raise NotFoundError(f"endpoint {endpoint.name!r} has no URL yet (it is {endpoint.status})")
        key = endpoint.config.api_key.get_secret_value() if endpoint.config.api_key else None
        return HttpTransport(endpoint.url, api_key=key)

    def _set_desired(self, name: str, variant: str, replicas: int) -> None:
        def change(e: Endpoint) -> Endpoint:
            states = [
                VariantState(
                    name=s.name, desired_replicas=replicas if s.name == variant else s.desired_replicas
                )
                for s in e.variants
            ]
            return e.model_copy(update={"variants": states})

        self.store.update_endpoint(name, change)

    def converge(self, name: str, variant: str, desired: int, ep: Endpoint, progress: Progress) -> None:
        """Start or retire replicas of `variant` (serving generation) until `desired` live ones remain."""
        live = [
            r
            for r in self.runtime.find_replicas(name)
            if r.variant == variant and r.generation == ep.generation and r.state in LIVE
        ]
        if len(live) < desired:
            started = self.start_replicas(
                ep.config, [(ep.config.variant(variant), desired - len(live))], ep.generation, progress
            )
            if ep.url is not None and started and self.router_alive(ep):  # a dead one would never see them
                RouterClient(ep).wait_healthy([r.id for r in started], ROUTER_SEES_S)
        elif len(live) > desired:
            newest_first = sorted(live, key=lambda r: r.started_at, reverse=True)
            victims = newest_first[: len(live) - desired]
            progress(f"draining {', '.join(r.id for r in victims)}")
            self.retire(name, victims, ep.config.drain_timeout_s)

    def retire(self, name: str, records: list[ReplicaRecord], drain_timeout: float) -> None:
        """Take replicas out of the router first (it stops sending them requests), then stop them."""
        if not records:
            return
        for record in records:
            with contextlib.suppress(NotFoundError):
                current = self.store.get_replica(record.id)
                self.store.put_replica(current.model_copy(update={"state": ReplicaState.DRAINING}))
        with contextlib.suppress(NotFoundError, ValueError):
            ep = self.store.get_endpoint(name)
            if self.router_alive(ep):
                RouterClient(ep).wait_not_routed([r.id for r in records], ROUTER_SEES_S)
        with ThreadPoolExecutor(max_workers=len(records), thread_name_prefix="replica-stop") as pool:
            list(pool.map(lambda r: self.runtime.stop_replica(r, drain_timeout), records))

    # ------------------------------------------------------------ reconcile
    def reconcile(
        self, name: str, *, ensure_controller: bool = False, progress: Progress = _quiet
    ) -> list[str]:
        """Make the processes match the state; returns what it did, in words (see `Reconciler`)."""
        return self._reconciler.reconcile(name, ensure_controller=ensure_controller, progress=progress)

    # ------------------------------------------------------------ delete
    def delete(self, name: str, *, progress: Progress = _quiet) -> bool:
        """Drain and stop the router and every replica, forget the endpoint, then stop its
        controller; False if none existed.

        The controller stays to the end: in Deleting it starts nothing, and if this process
        dies it finishes the delete (it recovers the interrupted operation)."""
        try:
            before = self.store.get_endpoint(name)
            displaced, displaced_op = before.operation_holder, before.operation
            endpoint = self.store.begin_operation(name, "delete", EndpointStatus.DELETING, force=True)
        except NotFoundError:
            return False
        progress(f"endpoint {name!r} is Deleting")
        drain = endpoint.config.drain_timeout_s
        self.stop_all(name, drain, keep_controller=True)
        if displaced is not None and not displaced.is_this_process() and displaced.alive():
            # an operation in flight (a CLI's update or scale) finds its writes refused and stops
            # what it started; wait for it, then sweep whatever it started before it noticed
            progress(f"waiting for the {displaced_op} it interrupted ({displaced.describe()})")
            until_gone = time.monotonic() + _DISPLACED_WAIT_S
            while displaced.alive() and time.monotonic() < until_gone:
                time.sleep(0.2)
            self.stop_all(name, drain, keep_controller=True)
        with contextlib.suppress(NotFoundError):  # deleted meanwhile: a concurrent delete finished first
            endpoint = self.store.get_endpoint(name)
        self.store.delete_endpoint(name)
        self.controller.stop(name, self._controller_to_stop(endpoint), _EXIT_GRACE_S)  # it would exit anyway
        progress(f"endpoint {name!r} deleted")
        if not any(e.config.platform.type == self.name for e in self.store.list_endpoints()):
            stop_gateway(self.home)  # the last local endpoint is gone: nothing left to serve
        return True

    @staticmethod
    def _controller_to_stop(endpoint: Endpoint) -> int | None:
        """The controller to stop, unless it is this process (the controller finishing a delete)."""
        return None if endpoint.controller_pid == os.getpid() else endpoint.controller_pid

    def stop_all(self, name: str, drain_timeout: float, *, keep_controller: bool = False) -> None:
        """Controller first (it would replace what we stop; `keep_controller`: a delete, when it
        starts nothing), the job service next (no new jobs leased), router next (no new requests
        reach replicas), then every replica in parallel."""
        with contextlib.suppress(NotFoundError):
            ep = self.store.get_endpoint(name)
            if not keep_controller:
                self.controller.stop(name, self._controller_to_stop(ep), _EXIT_GRACE_S)
            self.job_service.stop(ep, drain_timeout + _EXIT_GRACE_S)
            self.router.stop(name, ep.router_pid, drain_timeout + _EXIT_GRACE_S)
        records = self.store.replicas(name)
        if records:
            with ThreadPoolExecutor(max_workers=len(records), thread_name_prefix="replica-stop") as pool:
                list(pool.map(lambda r: self.runtime.stop_replica(r, drain_timeout), records))
        self.runtime.sweep_orphans(name)  # started by a control process killed before it recorded them


def _can_scale(ep: Endpoint) -> str | None:
    return None if ep.status is EndpointStatus.IN_SERVICE else f"it is {ep.status}, not InService"


def main(argv: list[str] | None = None) -> None:
    """`python -m twinserve.platforms.local.platform provision|update NAME`: what `--no-wait` runs detached
    (`update` reads the target EndpointConfig as JSON from stdin)."""
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}")
    parser.add_argument("command", choices=["provision", "update"])
    parser.add_argument("name")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--no-controller", action="store_true")
    parser.add_argument("--canary", type=float, action="append", default=[])
    parser.add_argument("--bake", type=float, default=0.0)
    args = parser.parse_args(argv)
    store = StateStore(args.state)
    manager = LocalPlatform(store, LocalRuntime(store, home=args.home))
    say: Progress = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        if args.command == "provision":
            manager.provision(args.name, controller=not args.no_controller, progress=say)
        else:
            target = EndpointConfig.from_dict(json.loads(sys.stdin.read()))
            manager.update(args.name, target, canary_percent=args.canary, bake_s=args.bake, progress=say)
    except Exception as exc:
        print(f"failed: {exc}", flush=True)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
