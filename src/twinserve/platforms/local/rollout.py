"""Blue/green updates: the new generation beside the old, traffic moved in steps, rollback.

```
Updating ─► green replicas (generation N+1) healthy in the router ─► traffic to green in steps
(canary %, each baked: green must stay alive, healthy, free of failed requests) ─► commit
(green is the serving generation) ─► blue leaves the router, then drains and stops ─► InService
any failure or Ctrl-C ─► RollingBack ─► traffic back to blue, green stopped ─► InService on blue,
the reason in failure_reason ─► UpdateRolledBackError
```
The URL never changes and no request is dropped: the router moves traffic by weights it syncs
from the state store, the control plane waits until the router applies each change, and a
request a retiring replica refuses (503) is retried on another.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import httpx
from pydantic import SecretStr

from twinserve.deploy.pinning import pin_config
from twinserve.deploy.spec import (
    Endpoint,
    EndpointConfig,
    EndpointStatus,
    ReplicaRecord,
    VariantConfig,
    VariantState,
)
from twinserve.errors import ModelLoadError, NotFoundError, UpdateRolledBackError, ValidationError
from twinserve.platforms.local.router.client import ROUTER_SEES_S, RouterClient

if TYPE_CHECKING:
    from twinserve.platforms.local.platform import LocalPlatform, Progress


def update(
    manager: LocalPlatform,
    name: str,
    target: EndpointConfig,
    *,
    canary_percent: Iterable[float] = (),
    bake_s: float = 0.0,
    progress: Progress,
) -> Endpoint:
    """Blue/green: serve `target` with no request dropped; roll back if it does not come up.

    Green gets the target's replica counts; a variant autoscaling owns keeps the count it has
    now (the autoscaler's choice survives an update). The API key must stay the same (the
    router and the clients would disagree mid-update; rotate by creating a new endpoint).
    Traffic moves to green through `canary_percent` steps, each held
    `bake_s` seconds while green's replicas must stay healthy and error-free, then 100%.
    Raises UpdateRolledBackError after a rollback (the endpoint is InService on the old
    generation, the reason in `failure_reason`); ConflictError while another operation runs.
    """
    if target.name != name:
        raise ValidationError(f"the config is for endpoint {target.name!r}, not {name!r}")
    current = manager.store.get_endpoint(name).config
    _check_async_change(current, target)
    current_key = current.api_key
    if _secret(target.api_key) != _secret(current_key):
        raise ValidationError(
            "an update cannot change the API key (clients and replicas would disagree mid-update); "
            "leave api_key out to keep it, or create a new endpoint with the new key"
        )
    if target.platform.type != "local":
        raise ValidationError(
            f"the config is for platform {target.platform.type!r}; an update keeps it local"
        )
    target = pin_config(target, progress)  # once: every green replica starts from the same versions
    steps = sorted({float(p) for p in canary_percent if 0 < float(p) < 100}) + [100.0]
    ep = manager.begin(name, "update", EndpointStatus.UPDATING, _can_update)
    generation = ep.generation + 1
    counts = [(v, _initial_count(ep, v, target)) for v in target.variants]
    manager.store.update_endpoint(
        name, lambda e: e.model_copy(update={"target": target, "target_share": 0.0})
    )
    progress(f"endpoint {name!r} is Updating to generation {generation}")
    green: list[ReplicaRecord] = []
    try:
        green = manager.start_replicas(target, counts, generation, progress)
        router = RouterClient(manager.store.get_endpoint(name))
        if not router.wait_healthy([r.id for r in green], ROUTER_SEES_S):
            raise ModelLoadError("the router did not see the new replicas healthy")
        for percent in steps:
            _shift(manager, name, router, percent / 100, progress)
            if percent < 100:
                _bake(manager, name, router, green, bake_s, progress)
    except BaseException as exc:
        _roll_back(manager, name, generation, exc, progress)
        if isinstance(exc, Exception):
            raise UpdateRolledBackError(
                f"update of {name!r} to generation {generation} failed and was rolled back: {exc}"
            ) from exc
        raise
    # commit: green becomes the serving generation; blue becomes stale (weight 0) and leaves
    variants = [VariantState(name=v.name, desired_replicas=n) for v, n in counts]
    manager.store.update_endpoint(
        name,
        lambda e: e.model_copy(
            update={
                "config": target,
                "generation": generation,
                "target": None,
                "target_share": 0.0,
                "variants": variants,
            }
        ),
    )
    blue = [r for r in manager.store.replicas(name) if r.generation < generation]
    progress(f"draining {len(blue)} replica(s) of generation {generation - 1}")
    manager.retire(name, blue, ep.config.drain_timeout_s)
    if target.async_inference is not None and target.async_inference != ep.config.async_inference:
        progress("the async settings changed: restarting the job service (same queue, same URL)")
        serving = manager.store.get_endpoint(name)
        manager.job_service.stop(serving, serving.config.drain_timeout_s + 10)
        manager.start_job_service(manager.store.get_endpoint(name))
    manager.store.end_operation(name, EndpointStatus.IN_SERVICE, clear_failure=True)
    progress(f"endpoint {name!r} is InService on generation {generation}")
    return manager.describe(name)


def _check_async_change(current: EndpointConfig, target: EndpointConfig) -> None:
    """An update keeps the endpoint's kind and its queue: jobs already accepted must stay reachable."""
    before, after = current.async_inference, target.async_inference
    if (before is None) != (after is None):
        kind = "async" if after is not None else "real-time"
        raise ValidationError(
            f"an update cannot make the endpoint {kind}: its clients and queue would change under "
            "them; create a new endpoint instead"
        )
    if before is not None and after is not None and before.queue_url != after.queue_url:
        raise ValidationError(
            "an update cannot move the endpoint's queue (async.queue_url): the jobs it holds would be "
            "stranded; drain it, then create a new endpoint"
        )


def _shift(manager: LocalPlatform, name: str, router: RouterClient, share: float, progress: Progress) -> None:
    ep = manager.store.update_endpoint(name, lambda e: e.model_copy(update={"target_share": share}))
    if not router.wait_weights(ep.traffic_weights(), ROUTER_SEES_S):
        raise ModelLoadError("the router did not take the new traffic weights")
    progress(f"traffic: {share:.0%} to generation {ep.generation + 1}")


def _bake(
    manager: LocalPlatform,
    name: str,
    router: RouterClient,
    green: list[ReplicaRecord],
    bake_s: float,
    progress: Progress,
) -> None:
    """Hold the canary step: every green replica stays alive, healthy and free of failed
    requests (connection failures and 5xx answers; a 4xx is the caller's error)."""
    if bake_s <= 0:
        return
    progress(f"baking for {bake_s:g}s")
    ids = {r.id for r in green}

    def failed() -> dict[str, tuple[int, str | None]]:
        try:
            listing = router.replicas()
        except (httpx.HTTPError, ValueError):
            return {}  # a router hiccup is not the new version's fault
        return {
            r["id"]: (r["failures"] + r["server_errors"], r["last_error"]) for r in listing if r["id"] in ids
        }

    base = {k: n for k, (n, _) in failed().items()}
    deadline = time.monotonic() + bake_s
    while time.monotonic() < deadline:
        for record in green:
            if not manager.runtime.replica_alive(record):
                raise ModelLoadError(f"replica {record.id} became unhealthy while baking")
        for replica_id, (count, last_error) in failed().items():
            if count > base.get(replica_id, 0):
                raise ModelLoadError(
                    f"replica {replica_id} failed {count - base.get(replica_id, 0)} request(s) while "
                    f"baking (connection failures or 5xx answers; last error: {last_error})"
                )
        time.sleep(0.5)


def _roll_back(
    manager: LocalPlatform, name: str, generation: int, exc: BaseException, progress: Progress
) -> None:
    reason = f"update to generation {generation} rolled back: {str(exc) or type(exc).__name__}"
    progress(f"{reason}; rolling back")
    with contextlib.suppress(NotFoundError):
        manager.store.update_endpoint(
            name,
            lambda e: e.model_copy(update={"status": EndpointStatus.ROLLING_BACK, "target_share": 0.0}),
        )
        abandon_target(manager, name, reason)
        progress(f"endpoint {name!r} is InService on generation {generation - 1}")


def abandon_target(manager: LocalPlatform, name: str, reason: str) -> None:
    """Undo an uncommitted update: the target's replicas leave the router and stop, the endpoint
    is InService on its serving generation with `reason` recorded. Also what reconcile does
    for an update whose process died."""
    ep = manager.store.get_endpoint(name)
    green = [r for r in ep.replicas if r.generation > ep.generation]
    manager.retire(name, green, ep.config.drain_timeout_s)
    manager.store.end_operation(name, EndpointStatus.IN_SERVICE, reason=reason, target=None, target_share=0.0)


def _secret(key: SecretStr | None) -> str | None:
    return None if key is None else key.get_secret_value()


def _can_update(ep: Endpoint) -> str | None:
    if ep.status is EndpointStatus.IN_SERVICE:
        return None
    return f"it is {ep.status} (a Failed endpoint is deleted and created again)"


def _initial_count(ep: Endpoint, variant: VariantConfig, target: EndpointConfig) -> int:
    """Green's replicas: the target's count, unless autoscaling owns the variant; then what the
    same-named variant runs now (the autoscaler's choice survives), within the new bounds."""
    policy = target.autoscaling
    if policy is None or policy.variant not in (None, variant.name):
        return variant.replicas
    names = {v.name for v in ep.config.variants}
    count = ep.desired(variant.name) if variant.name in names else variant.replicas
    return min(max(count, policy.min_replicas), policy.max_replicas)
