"""Blue/green updates on SageMaker: a new generation beside the old, traffic moved by SageMaker.

```
check and size generation N+1 ─► Updating ─► its models + endpoint config ─► rollback alarms
─► update_endpoint(DeploymentConfig: BlueGreenUpdatePolicy + AutoRollbackConfiguration) ─► wait
  InService on N+1: commit, autoscaling re-applied, generation N's models and config deleted
  InService on N (SageMaker rolled back): N+1's deleted, reason recorded ─► UpdateRolledBackError
  Failed / UpdateRollbackFailed: Failed, both generations kept (delete removes them) ─► raise
```
SageMaker runs the traffic shifting, baking and rollback itself; twinserve picks the policy
(deployment.py), watches the outcome and keeps the state store in step. A variant whose
instance type changes (or that goes away) loses its autoscaling for the update, as AWS
requires, and gets the target's policy back after it. An update interrupted after
`update_endpoint` was sent is settled from AWS by the next operation (`settle_interrupted`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus, VariantState
from twinserve.errors import (
    BusyError,
    ConflictError,
    ModelLoadError,
    NotFoundError,
    TwinserveError,
    ValidationError,
)
from twinserve.platforms.sagemaker import autoscaling, deployment, resources, steps
from twinserve.platforms.sagemaker.clients import Region, aws_step
from twinserve.platforms.sagemaker.create import create_generation, locate_data, upload
from twinserve.platforms.sagemaker.names import rollback_alarm_names
from twinserve.platforms.sagemaker.prepare import Generation, prepare, settings_of
from twinserve.platforms.sagemaker.teardown import delete_generation

if TYPE_CHECKING:
    from twinserve.deploy.platform import Progress
    from twinserve.platforms.sagemaker.platform import SageMakerPlatform


def update(
    platform: SageMakerPlatform,
    name: str,
    target: EndpointConfig,
    *,
    canary_percent: Iterable[float] = (),
    bake_s: float = 0.0,
    progress: Progress,
) -> Endpoint:
    """Roll `target` out as generation N+1; the endpoint InService on it, or raise (see module doc)."""
    platform.recover(name)
    current, region, gen, routing, guarded = _plan(platform, name, target, canary_percent, bake_s, progress)
    account = platform.clients.account(region.name)
    token = steps.read_token(region, gen.token_secret)
    gen = locate_data(gen, account)
    held = platform.begin(name, "update", EndpointStatus.UPDATING)
    if held.generation != current.generation:  # another update landed meanwhile
        platform.store.end_operation(name, EndpointStatus.IN_SERVICE)
        raise ConflictError(f"endpoint {name!r} changed meanwhile (generation {held.generation}); try again")
    alarms = _record_target(platform, gen, guarded)
    progress(f"endpoint {name!r} is Updating to generation {gen.number}")
    descaled = _descaled(current, gen)
    sent = False
    try:
        gen = upload(region, gen, progress)
        create_generation(region, gen, token, progress)
        token = None
        if descaled:
            autoscaling.remove_variants(region, name, descaled, progress)
        params, timeout_s = _update_params(region, gen, routing, alarms, guarded, progress)
        with aws_step(f"update_endpoint {name}"):
            region.sagemaker.update_endpoint(**params)
        sent = True
        reply = steps.wait_endpoint(
            region, name, timeout_s=timeout_s, poll_s=platform.poll_interval_s, progress=progress
        )
    except BaseException as exc:
        if sent:  # SageMaker goes on without us: the next operation settles it from AWS
            with contextlib.suppress(NotFoundError):
                reason = f"update interrupted while SageMaker was updating: {exc}"
                platform.store.end_operation(name, EndpointStatus.UPDATING, reason=reason)
        else:
            reason = f"update to generation {gen.number} failed: {exc}"
            _abandon(platform, region, name, gen, current, descaled, reason, progress)
        raise
    return _outcome(platform, region, current, gen, descaled, reply, progress)


def _plan(
    platform: SageMakerPlatform,
    name: str,
    target: EndpointConfig,
    canary_percent: Iterable[float],
    bake_s: float,
    progress: Progress,
) -> tuple[Endpoint, Region, Generation, dict[str, Any], bool]:
    """The checks and decisions of an update, before anything changes: (current, region,
    generation N+1, traffic routing, guarded: same variant names, so guardrails apply)."""
    current = platform.store.get_endpoint(name)
    if target.name != name:
        raise ValidationError(f"the config is for endpoint {target.name!r}, not {name!r}")
    target = _in_region(current, target)
    if (current.config.async_inference is None) != (target.async_inference is None):
        kind = "real-time" if current.config.async_inference is None else "async"
        raise ValidationError(
            f"endpoint {name!r} is {kind}; an update keeps it so (its callers use "
            f"{'InvokeEndpoint' if kind == 'real-time' else 'InvokeEndpointAsync'}): create a new endpoint",
            param="async",
        )
    region = platform.region_of(current)
    live = steps.describe_endpoint(region, current.resources.get("endpoint", name))
    counts = _counts(current, target, live)
    gen = prepare(target, current.generation + 1, default_region=region.name, counts=counts)
    for v in gen.variants:
        for note in v.sizing.notes:
            progress(note)
    guarded = {v.name for v in current.config.variants} == {v.variant for v in gen.variants}
    steps_asked = [p for p in canary_percent if 0 < float(p) < 100]
    if not guarded and steps_asked:
        raise ValidationError(
            "canary steps need the same variant names in the old and new config (SageMaker)"
        )
    routing = deployment.traffic_routing(steps_asked, bake_s, min(v.initial_count for v in gen.variants))
    return current, region, gen, routing, guarded


def _record_target(platform: SageMakerPlatform, gen: Generation, guarded: bool) -> list[str]:
    """Record the target and the names of what the update creates (before creating it); the
    rollback alarms' names."""
    name = gen.endpoint
    alarms = [a for v in gen.variants for a in rollback_alarm_names(name, v.variant)] if guarded else []
    intended = sorted({*alarms, *autoscaling.parts(gen.config)[1]})

    def change(e: Endpoint) -> Endpoint:
        res = resources.with_alarms(
            {**e.resources, **resources.generation_resources(gen, target=True)}, intended
        )
        return e.model_copy(update={"target": gen.config, "target_share": 0.0, "resources": res})

    platform.store.update_endpoint(name, change)
    return alarms


def _in_region(current: Endpoint, target: EndpointConfig) -> EndpointConfig:
    """`target` with the endpoint's region (an update cannot move it)."""
    settings = settings_of(target)
    region = current.resources.get("region") or settings_of(current.config).region
    if settings.region and settings.region != region:
        raise ValidationError(
            f"endpoint {current.name!r} runs in {region}; an update cannot move it to {settings.region} "
            "(create a new endpoint there)",
            param="platform.sagemaker.region",
        )
    filled = settings.model_copy(update={"region": region})
    return target.model_copy(update={"platform": target.platform.model_copy(update={"sagemaker": filled})})


def _counts(current: Endpoint, target: EndpointConfig, live: dict[str, Any] | None) -> dict[str, int]:
    """InitialInstanceCount of the new fleet: an autoscaled variant keeps what AWS runs now."""
    policy = target.autoscaling
    running = {
        pv["VariantName"]: pv.get("DesiredInstanceCount") for pv in (live or {}).get("ProductionVariants", [])
    }
    counts: dict[str, int] = {}
    for v in target.variants:
        if policy is not None and policy.variant in (None, v.name) and running.get(v.name):
            counts[v.name] = min(max(int(running[v.name]), policy.min_replicas), policy.max_replicas)
    return counts


def _descaled(current: Endpoint, gen: Generation) -> list[str]:
    """Autoscaled variants AWS refuses to update under a policy: instance type changed, or removed."""
    policy = current.config.autoscaling
    if policy is None:
        return []
    new = {v.variant: v.instance_type for v in gen.variants}
    return [
        v.name
        for v in current.config.variants
        if policy.variant in (None, v.name)
        and new.get(v.name) != current.resources.get(f"instance_type.{v.name}")
    ]


def _update_params(
    region: Region,
    gen: Generation,
    routing: dict[str, Any],
    alarms: list[str],
    guarded: bool,
    progress: Progress,
) -> tuple[dict[str, Any], float]:
    """UpdateEndpoint's kwargs (rollback alarms put first) and how long to wait for it."""
    settings = gen.settings
    start_s = max(v.sizing.download_timeout_s + v.sizing.startup_timeout_s for v in gen.variants)
    timeout = deployment.execution_timeout(settings, routing, start_s, settings.termination_wait_s)
    params: dict[str, Any] = {"EndpointName": gen.endpoint, "EndpointConfigName": gen.config_name}
    if not guarded:
        progress("the variant names change: SageMaker updates all at once, without canary or auto-rollback")
        return params, float(timeout + 600)
    for v in gen.variants:
        for alarm in deployment.rollback_alarms(gen.endpoint, v.variant, settings):
            with aws_step(f"cloudwatch.put_metric_alarm {alarm['AlarmName']}"):
                region.cloudwatch.put_metric_alarm(**alarm)
    params["DeploymentConfig"] = deployment.deployment_config(
        routing, alarms, termination_wait_s=settings.termination_wait_s, execution_timeout_s=timeout
    )
    shift = routing["Type"].lower().replace("_", " ")
    progress(f"blue/green ({shift}), rolled back by {', '.join(alarms)}")
    return params, float(timeout + 600)


def _outcome(
    platform: SageMakerPlatform,
    region: Region,
    current: Endpoint,
    gen: Generation,
    descaled: list[str],
    reply: dict[str, Any],
    progress: Progress,
) -> Endpoint:
    name, status = gen.endpoint, reply["EndpointStatus"]
    if status == "InService" and reply.get("EndpointConfigName") == gen.config_name:
        return commit(platform, region, current, gen.config, gen.number, progress)
    if status == "InService":
        why = (
            reply.get("FailureReason") or "SageMaker rolled it back (an alarm fired, or the new fleet failed)"
        )
        reason = f"update to generation {gen.number} rolled back: {why}"
        progress(reason)
        _abandon(platform, region, name, gen, current, descaled, reason, progress)
        from twinserve.errors import UpdateRolledBackError

        raise UpdateRolledBackError(
            f"update of {name!r} failed and was rolled back; generation {current.generation} serves: {why}"
        )
    report = steps.failure_report(region, reply)
    platform.store.end_operation(
        name, EndpointStatus.FAILED, reason=f"update to generation {gen.number}: {report}"
    )
    raise ModelLoadError(f"update of {name!r} left it {status}: {report}")


def commit(
    platform: SageMakerPlatform,
    region: Region,
    current: Endpoint,
    config: EndpointConfig,
    number: int,
    progress: Progress,
) -> Endpoint:
    """The target generation serves: record it, give it its autoscaling, delete the old generation."""
    name = current.name
    old = platform.store.get_endpoint(name).resources
    old_models, old_configs = resources.models(old, target=False), resources.configs(old, target=False)
    variants = [VariantState(name=v.name, desired_replicas=v.replicas) for v in config.variants]
    platform.store.update_endpoint(
        name,
        lambda e: e.model_copy(
            update={
                "config": config, "generation": number, "target": None, "target_share": 0.0,
                "variants": variants, "resources": resources.promote_target(e.resources),
            }
        ),
    )  # fmt: skip
    problems: list[TwinserveError] = []
    try:
        autoscaling.change(region, current.config, config, progress)
    except TwinserveError as exc:
        problems.append(exc)
    problems += delete_generation(region, old_models, old_configs, progress)
    if problems:
        reason = f"generation {number} serves, but: " + "; ".join(p.message for p in problems)
        platform.store.end_operation(name, EndpointStatus.IN_SERVICE, reason=reason)
        raise type(problems[0])(reason)
    platform.store.end_operation(name, EndpointStatus.IN_SERVICE, clear_failure=True)
    progress(f"endpoint {name!r} is InService on generation {number}")
    return platform.describe(name)


def _abandon(
    platform: SageMakerPlatform,
    region: Region,
    name: str,
    gen: Generation,
    current: Endpoint,
    descaled: list[str],
    reason: str,
    progress: Progress,
) -> None:
    """Undo an update that did not take: delete generation N+1, give back the old autoscaling."""
    res = platform.store.get_endpoint(name).resources
    failures = delete_generation(
        region, resources.models(res, target=True), resources.configs(res, target=True), progress
    )
    if descaled:
        try:
            autoscaling.apply(region, current.config, progress)
        except TwinserveError as exc:
            failures.append(exc)
    if failures:
        reason += "; clean-up incomplete: " + "; ".join(f.message for f in failures)
    keep = res if failures else resources.without_generation(res, target=True)
    with contextlib.suppress(NotFoundError):
        platform.store.end_operation(
            name, EndpointStatus.IN_SERVICE, reason=reason, target=None, target_share=0.0, resources=keep
        )


def settle_interrupted(platform: SageMakerPlatform, name: str) -> None:
    """An operation whose process died (or an update left Updating): settle it from AWS.

    BusyError while SageMaker is still working on it; otherwise the target generation is
    committed if the endpoint runs it, else deleted, and the endpoint gets AWS's status.
    """
    from twinserve.platforms.sagemaker.platform import STATUS

    ep = platform.store.get_endpoint(name)
    region = platform.region_of(ep)
    reply = steps.describe_endpoint(region, ep.resources.get("endpoint", name))
    if reply is None:  # interrupted before create_endpoint, or deleted outside twinserve
        gone = f"the {ep.operation or 'update'} was interrupted and there is no SageMaker endpoint {name}"
        platform.store.end_operation(
            name, EndpointStatus.FAILED, reason=f"{gone}; delete and create it again"
        )
        return
    status = reply["EndpointStatus"]
    if status in steps.SETTLING:
        raise BusyError(f"endpoint {name!r}: SageMaker is still {status}; wait for it")
    reason: str | None = None
    if ep.target is not None and status == "InService":
        if reply.get("EndpointConfigName") == ep.resources.get(f"{resources.TARGET}endpoint_config"):
            commit(platform, region, ep, ep.target, ep.generation + 1, lambda _: None)
            return
        res = ep.resources
        delete_generation(
            region, resources.models(res, target=True), resources.configs(res, target=True), lambda _: None
        )
        ep = ep.model_copy(update={"resources": resources.without_generation(res, target=True)})
        why = reply.get("FailureReason") or "SageMaker rolled it back"
        reason = f"the interrupted update to generation {ep.generation + 1} did not take: {why}"
    if ep.operation == "create" and status == "InService":
        autoscaling.apply(region, ep.config, lambda _: None)
    platform.store.end_operation(
        name, STATUS.get(status, EndpointStatus.FAILED), reason=reason, target=None, target_share=0.0,
        resources=ep.resources,
    )  # fmt: skip
