"""The `ray` platform: an endpoint is a Ray Serve application of one deployment, our LLM microservice.

```
twinserve endpoint create NAME --platform ray ──► Serve application NAME (route prefix /NAME)
                                                  └─ deployment <variant>: LLMReplica × N, one engine each
clients ──► Serve's HTTP proxy (every node) ──► replicas       (TGI, OpenAI, SageMaker routes, /metrics)
```
Serve owns routing, replica placement across nodes, autoscaling, health checks and rolling
updates; twinserve owns the pinning (every replica loads the version `create`/`update` pinned,
from the registry), the mapping of our config onto Serve's (`options.py`), and the record in the
state store, so `list`, `describe` and later commands find the endpoint and its cluster.
What Serve reports is the truth: `describe` reads the application's status, each replica's state
and the reason a deployment is pending (e.g. resources the cluster cannot give).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twinserve.deploy.lease import OperationHolder
from twinserve.deploy.pinning import pin_config
from twinserve.deploy.platform import Capabilities, Progress, quiet
from twinserve.deploy.platform_config import PlatformName, RaySettings
from twinserve.deploy.policies import AutoscalingPolicy
from twinserve.deploy.spec import (
    Endpoint,
    EndpointConfig,
    EndpointStatus,
    ReplicaRecord,
    ScalingEvent,
)
from twinserve.deploy.state import StateStore
from twinserve.errors import (
    ConflictError,
    ModelLoadError,
    NotFoundError,
    UpdateRolledBackError,
    ValidationError,
)
from twinserve.platforms.ray.cluster import connected, proxy_base_url, replica_env, serve_details, start_serve
from twinserve.platforms.ray.options import check_supported, code_version, deployment_options, serve_flags
from twinserve.platforms.ray.replica import deployment
from twinserve.platforms.ray.status import observed, reason_of, serve_name
from twinserve.server.process import tail_lines

_POLL_S = 0.5


class RayPlatform:
    """Endpoints as Serve applications on a Ray cluster (one driver connection per call)."""

    name: PlatformName = "ray"
    capabilities = Capabilities(
        native_routing=True,
        native_autoscaling=True,
        traffic_shifting=frozenset({"all_at_once"}),
        scale_to_zero=True,
        runtime_api=False,
    )

    def __init__(self, store: StateStore | None = None) -> None:
        self.store = store or StateStore()

    # ------------------------------------------------------------ create
    def create(self, config: EndpointConfig, *, wait: bool = True, progress: Progress = quiet) -> Endpoint:
        """Deploy generation 1; with `wait`, return it InService, or raise with Serve's reason
        (the application is deleted, the record stays Failed). Without `wait`, return it
        Creating: `describe` follows Serve's progress, a pending reason included."""
        if config.platform.type != self.name:
            raise ValidationError(
                f"endpoint {config.name!r} is for platform {config.platform.type!r}, not ray"
            )
        check_supported(config)
        settings = _settings(config)
        with connected(settings):
            details = serve_details()
            if details is not None and config.name in details.get("applications", {}):
                raise ConflictError(
                    f"the Ray cluster already runs a Serve application {config.name!r} that twinserve "
                    "does not know; pick another name or `serve shutdown` it"
                )
            config = pin_config(config, progress)  # an unknown alias is a 404 before anything runs
            new = Endpoint.new(config).model_copy(
                update={
                    "operation": "create",
                    "operation_holder": OperationHolder.this_process(),
                    "resources": {"ray_application": config.name, "ray_address": settings.address},
                }
            )
            self.store.put_endpoint(new)
            try:
                start_serve(settings)
                progress(f"deploying Serve application {config.name!r} on {settings.address}")
                self._deploy(config, 1, config.variants[0].replicas)
                url = f"{proxy_base_url(settings, serve_details() or {})}/{config.name}"
                self.store.update_endpoint(config.name, lambda ep: ep.model_copy(update={"url": url}))
                if not wait:
                    self.store.end_operation(config.name, EndpointStatus.CREATING)
                    return self.describe(config.name)
                self._await_rollout(config.name, set(), config.startup_timeout_s, progress)
            except BaseException as exc:  # Ctrl-C included: nothing may keep running unrecorded
                reason = exc.message if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    _delete_application(config.name)
                self.store.end_operation(config.name, EndpointStatus.FAILED, reason=reason)
                raise
            self.store.end_operation(config.name, EndpointStatus.IN_SERVICE, clear_failure=True)
            progress(f"endpoint {config.name!r} is InService")
            return self.describe(config.name)

    # ------------------------------------------------------------ update
    def update(
        self,
        name: str,
        target: EndpointConfig,
        *,
        canary_percent: Iterable[float] = (),
        bake_s: float = 0.0,
        progress: Progress = quiet,
    ) -> Endpoint:
        """Roll generation N+1 out with Serve's surge rollout: all new replicas start (and load
        the new pin) while the old ones serve, then the old ones drain. A generation that does
        not become healthy is rolled back to N, whose replicas never stopped."""
        if tuple(canary_percent) or bake_s:
            raise ValidationError(
                "the ray platform rolls replicas in place (Serve's surge rollout); canary steps and "
                "bake times are for the local and sagemaker platforms",
                param="canary_percent",
            )
        check_supported(target)
        ep = self._begin(name, "update", EndpointStatus.UPDATING)
        try:
            target = pin_config(target, progress)
            replicas = ep.desired(ep.config.variants[0].name)
            with connected(_settings(ep.config)):
                before = {r.id for r in self._replicas(ep)}
                self.store.update_endpoint(name, lambda e: e.model_copy(update={"target": target}))
                progress(f"rolling generation {ep.generation + 1} out")
                self._deploy(target, ep.generation + 1, replicas)
                try:
                    self._await_rollout(name, before, target.startup_timeout_s, progress)
                except ModelLoadError as exc:
                    reason = exc.message
                    self._roll_back(ep, reason, progress)
                    raise UpdateRolledBackError(
                        f"update of {name!r} rolled back to generation {ep.generation}: {reason}"
                    ) from exc
        except BaseException:
            current = self.store.get_endpoint(name)
            if current.operation == "update":
                self.store.end_operation(name, EndpointStatus.IN_SERVICE, target=None)
            raise
        self.store.end_operation(
            name,
            EndpointStatus.IN_SERVICE,
            clear_failure=True,
            config=target,
            generation=ep.generation + 1,
            target=None,
        )
        progress(f"endpoint {name!r} serves generation {ep.generation + 1}")
        return self.describe(name)

    def _roll_back(self, ep: Endpoint, reason: str, progress: Progress) -> None:
        """Deploy generation N again: its replicas kept serving (a surge rollout that fails stops
        none of them), so this only stops the failed new ones."""
        progress(f"rolling back to generation {ep.generation}: {reason}")
        self.store.update_endpoint(
            ep.name, lambda e: e.model_copy(update={"status": EndpointStatus.ROLLING_BACK})
        )
        self._deploy(ep.config, ep.generation, ep.desired(ep.config.variants[0].name))
        self._await_rollout(ep.name, set(), ep.config.startup_timeout_s, progress)
        self.store.end_operation(ep.name, EndpointStatus.IN_SERVICE, reason=reason, target=None)

    # ------------------------------------------------------------ scale and autoscaling
    def scale(
        self, name: str, replicas: int, *, variant: str | None = None, progress: Progress = quiet
    ) -> Endpoint:
        """Set num_replicas (autoscaling off): Serve adds or drains replicas in place."""
        ep = self.store.get_endpoint(name)
        chosen = variant or ep.config.variants[0].name
        ep.config.variant(chosen)  # KeyError: unknown variant
        if ep.config.autoscaling is not None:
            raise ConflictError(
                f"endpoint {name!r} autoscales (Serve's autoscaler owns its replica count); change its "
                "bounds with `twinserve endpoint autoscaling` or turn autoscaling off first"
            )
        if replicas < 1:
            raise ValidationError(
                "a real-time endpoint without autoscaling keeps >= 1 replica", param="replicas"
            )
        ep = self._begin(name, "scale", EndpointStatus.UPDATING)
        before = ep.desired(chosen)
        try:
            with connected(_settings(ep.config)):
                self._deploy(ep.config, ep.generation, replicas)
                self._set_desired(name, chosen, replicas)
                self.store.record_event(
                    ScalingEvent(
                        endpoint=name,
                        variant=chosen,
                        from_replicas=before,
                        to_replicas=replicas,
                        reason="endpoint scale (manual)",
                    )
                )
                self._await_count(name, replicas, ep.config.startup_timeout_s, progress)
        finally:
            self.store.end_operation(name, EndpointStatus.IN_SERVICE)
        progress(f"endpoint {name!r}: {replicas} replica(s)")
        return self.describe(name)

    def set_autoscaling(
        self, name: str, policy: AutoscalingPolicy | None, *, progress: Progress = quiet
    ) -> Endpoint:
        """Serve's autoscaling_config from `policy` (None: a fixed count, the last desired one);
        the replicas keep running (a lightweight config change, same code version)."""
        ep = self._begin(name, "autoscaling", EndpointStatus.UPDATING)
        try:
            config = ep.config_with_policy(policy)
            check_supported(config)
            with connected(_settings(config)):
                self._deploy(config, ep.generation, ep.desired(config.variants[0].name))
            self.store.update_endpoint(name, lambda e: e.model_copy(update={"config": config}))
        finally:
            self.store.end_operation(name, EndpointStatus.IN_SERVICE)
        progress(f"endpoint {name!r}: autoscaling {'set' if policy else 'off'}")
        return self.describe(name)

    # ------------------------------------------------------------ read
    def describe(self, name: str) -> Endpoint:
        """The endpoint as Serve reports it now: status, replicas, counts, a pending reason."""
        ep = self.store.get_endpoint(name)
        with connected(_settings(ep.config)):
            app = ((serve_details() or {}).get("applications") or {}).get(name)
        return observed(ep, app)

    def list_endpoints(self) -> list[Endpoint]:
        found = []
        for ep in self.store.list_endpoints():
            if ep.config.platform.type != self.name:
                continue
            with contextlib.suppress(NotFoundError):
                found.append(self.describe(ep.name))
        return found

    def events(self, name: str, limit: int | None = 20) -> list[ScalingEvent]:
        self.store.get_endpoint(name)
        return self.store.events(name, limit=limit)

    def logs(self, name: str, lines: int = 50) -> dict[str, str]:
        """Each replica's Serve log and the Serve controller's, where this machine can read them
        (a local cluster; on a remote one, the node and file are named)."""
        ep = self.store.get_endpoint(name)
        with connected(_settings(ep.config)) as ray:
            app = ((serve_details() or {}).get("applications") or {}).get(name) or {}
            logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
        out: dict[str, str] = {}
        for deployment_details in (app.get("deployments") or {}).values():
            for replica in deployment_details.get("replicas") or []:
                path = logs_dir / str(replica.get("log_file_path") or "").lstrip("/")
                out[str(replica["replica_id"])] = (
                    tail_lines(path, lines)
                    if path.is_file()
                    else f"(on node {replica.get('node_ip')}: {replica.get('log_file_path')})"
                )
        controllers = sorted((logs_dir / "serve").glob("controller_*.log"))
        if controllers:
            out["serve-controller"] = tail_lines(controllers[-1], lines)
        return out

    # ------------------------------------------------------------ delete
    def delete(self, name: str, *, progress: Progress = quiet) -> bool:
        """Delete the Serve application (its replicas drain and stop) and forget the endpoint;
        Serve itself is shut down when no application is left in the cluster."""
        try:
            ep = self.store.begin_operation(name, "delete", EndpointStatus.DELETING, force=True)
        except NotFoundError:
            return False
        with connected(_settings(ep.config)):
            progress(f"deleting Serve application {name!r}")
            _delete_application(name)
            details = serve_details()
            if details is not None and not details.get("applications"):
                from ray import serve

                serve.shutdown()
        self.store.delete_endpoint(name)
        progress(f"endpoint {name!r} deleted")
        return True

    def transport(self, endpoint: Endpoint) -> Any:
        """HTTP to the endpoint's route on Serve's proxy, with its API key."""
        from twinserve.client.transport import HttpTransport

        if endpoint.url is None:
            raise NotFoundError(f"endpoint {endpoint.name!r} has no URL yet (it is {endpoint.status})")
        key = endpoint.config.api_key.get_secret_value() if endpoint.config.api_key else None
        return HttpTransport(endpoint.url, api_key=key)

    # ------------------------------------------------------------ internals
    def _begin(self, name: str, operation: str, status: EndpointStatus) -> Endpoint:
        """Take an InService endpoint; an operation whose process died is released first (Serve
        finishes what it was asked on its own; `describe` shows where it got)."""
        ep = self.store.get_endpoint(name)
        if ep.operation is not None and not (ep.operation_holder and ep.operation_holder.alive()):
            self.store.end_operation(name, EndpointStatus.IN_SERVICE, target=None)
        self._record_observed(name)

        def in_service(e: Endpoint) -> str | None:
            return None if e.status is EndpointStatus.IN_SERVICE else f"it is {e.status}, not InService"

        return self.store.begin_operation(name, operation, status, allowed=in_service)

    def _record_observed(self, name: str) -> None:
        """Store the status Serve reports when no operation holds the endpoint (a `--no-wait`
        create that has since come up, or failed), so the next operation starts from it."""
        with connected(_settings(self.store.get_endpoint(name).config)):
            observed = self.describe(name)

        def settle(e: Endpoint) -> Endpoint:
            if e.operation is not None:
                return e
            return e.model_copy(update={"status": observed.status, "failure_reason": observed.failure_reason})

        self.store.update_endpoint(name, settle)

    def _deploy(self, config: EndpointConfig, generation: int, replicas: int) -> None:
        """Ask Serve for `config` at `generation` (returns once Serve has the new target)."""
        from ray import serve
        from ray.serve.api import RunTarget

        settings = _settings(config)
        variant = config.variants[0]
        app = (
            deployment(variant.name)
            .options(
                version=code_version(config, generation, settings),
                _internal=True,  # a stable version: a scale resizes in place instead of restarting
                **deployment_options(config, replicas, settings),
            )
            .bind(serve_flags(config, variant, settings), replica_env())
        )
        serve.run_many(
            [RunTarget(target=app, name=config.name, route_prefix=f"/{config.name}")],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )

    def _replicas(self, ep: Endpoint) -> list[ReplicaRecord]:
        app = ((serve_details() or {}).get("applications") or {}).get(ep.name)
        return observed(ep, app).replicas

    def _await_rollout(self, name: str, old: set[str], timeout_s: float, progress: Progress) -> None:
        """Until the application runs with no replica from `old` left: ModelLoadError when Serve
        gives up on the deployment, or (with Serve's pending reason) after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        said = ""
        while True:
            app = ((serve_details() or {}).get("applications") or {}).get(name) or {}
            status = serve_name(app.get("status"))
            reason = reason_of(app)
            running = {
                str(r["replica_id"])
                for d in (app.get("deployments") or {}).values()
                for r in d.get("replicas") or []
            }
            if status == "DEPLOY_FAILED":
                raise ModelLoadError(f"Serve could not deploy {name!r}: {reason or 'see endpoint logs'}")
            if status == "RUNNING" and not (running & old):
                return
            if reason and reason != said:
                progress(reason)
                said = reason
            if time.monotonic() >= deadline:
                raise ModelLoadError(
                    f"{name!r} was not running after {timeout_s:g} s (startup_timeout_s): "
                    f"{reason or f'application {status}'}"
                )
            time.sleep(_POLL_S)

    def _await_count(self, name: str, replicas: int, timeout_s: float, progress: Progress) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            app = ((serve_details() or {}).get("applications") or {}).get(name) or {}
            states = [
                r.get("state")
                for d in (app.get("deployments") or {}).values()
                for r in d.get("replicas") or []
            ]
            if app.get("status") == "RUNNING" and states.count("RUNNING") == replicas == len(states):
                return
            time.sleep(_POLL_S)
        progress(f"{name!r} has not reached {replicas} replica(s) yet; `describe` follows it")

    def _set_desired(self, name: str, variant: str, replicas: int) -> None:
        def change(e: Endpoint) -> Endpoint:
            variants = [
                v.model_copy(update={"desired_replicas": replicas}) if v.name == variant else v
                for v in e.variants
            ]
            return e.model_copy(update={"variants": variants})

        self.store.update_endpoint(name, change)


def _settings(config: EndpointConfig) -> RaySettings:
    return config.platform.ray or RaySettings()


def _delete_application(name: str) -> None:
    from ray import serve

    if name in ((serve_details() or {}).get("applications") or {}):
        serve.delete(name)  # blocks until its replicas have stopped
