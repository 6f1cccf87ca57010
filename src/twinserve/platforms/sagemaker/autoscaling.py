"""Apply an endpoint's autoscaling policy for real, and take it away again.

`scaling.sagemaker_scaling_calls` turns the policy into Application Auto Scaling and CloudWatch
calls; here they are run in order (an alarm after the policy whose ARN it needs). Changing
the policy runs the new calls and removes what only the old one had (a policy of another
type, the alarms of a step that is gone, the target of a variant no longer scaled), so a
`set_autoscaling` is a diff, never a gap without scaling. Removal tolerates "already gone":
it is also how `delete` cleans up after a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twinserve.deploy.spec import EndpointConfig
from twinserve.platforms.sagemaker.clients import Region, aws_step, tolerate_gone
from twinserve.platforms.sagemaker.scaling import (
    SCALABLE_DIMENSION,
    SageMakerCall,
    resource_id,
    sagemaker_scaling_calls,
    with_policy_arn,
)

Progress = Callable[[str], None]


def _client(region: Region, call: SageMakerCall) -> Any:
    return region.cloudwatch if call.service == "cloudwatch" else region.application_autoscaling


def apply(region: Region, config: EndpointConfig, progress: Progress) -> list[str]:
    """Run the policy's calls; the names of the alarms it created."""
    arn: str | None = None
    alarms: list[str] = []
    for call in sagemaker_scaling_calls(config):
        if call.operation == "put_metric_alarm":
            assert arn is not None  # scaling.py puts each alarm right after its policy
            call = with_policy_arn(call, arn)
            alarms.append(call.params["AlarmName"])
        with aws_step(f"{call.service}.{call.operation}"):
            reply = getattr(_client(region, call), call.operation)(**call.params)
        if call.operation == "put_scaling_policy":
            arn = reply["PolicyARN"]
            progress(f"scaling policy {call.params['PolicyName']} applied")
        elif call.operation == "register_scalable_target":
            p = call.params
            progress(f"autoscaling {p['ResourceId']}: {p['MinCapacity']}..{p['MaxCapacity']} instances")
    return alarms


def parts(config: EndpointConfig | None) -> tuple[set[tuple[str, str]], set[str], set[str]]:
    """(resource id, policy name), alarm names and scalable targets the config's policy has."""
    policies: set[tuple[str, str]] = set()
    alarms: set[str] = set()
    targets: set[str] = set()
    for call in sagemaker_scaling_calls(config) if config is not None else []:
        p = call.params
        if call.operation == "register_scalable_target":
            targets.add(p["ResourceId"])
        elif call.operation == "put_scaling_policy":
            policies.add((p["ResourceId"], p["PolicyName"]))
        else:
            alarms.add(p["AlarmName"])
    return policies, alarms, targets


def change(region: Region, old: EndpointConfig, new: EndpointConfig, progress: Progress) -> list[str]:
    """Give the endpoint `new`'s policy (None removes): apply it, then drop what only `old` had."""
    alarms = apply(region, new, progress)
    old_policies, old_alarms, old_targets = parts(old)
    new_policies, new_alarms, new_targets = parts(new)
    delete_alarms(region, old_alarms - new_alarms)
    for rid, policy in sorted(old_policies - new_policies):
        _delete_policy(region, rid, policy)
    for rid in sorted(old_targets - new_targets):
        _deregister(region, rid)
        progress(f"autoscaling of {rid} removed")
    return alarms


def remove_variants(region: Region, endpoint: str, variants: Iterable[str], progress: Progress) -> None:
    """Every scaling policy and the scalable target of each variant (found on AWS, not assumed)."""
    for variant in variants:
        rid = resource_id(endpoint, variant)
        with aws_step(f"application-autoscaling.describe_scaling_policies {rid}"):
            found = region.application_autoscaling.describe_scaling_policies(
                ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION
            ).get("ScalingPolicies", [])
        for policy in found:
            if policy.get("ResourceId") == rid:  # an exact match: `twin` is not `twin-b`
                _delete_policy(region, rid, policy["PolicyName"])
        if _deregister(region, rid):
            progress(f"autoscaling of {rid} removed")


def remove(region: Region, config: EndpointConfig, progress: Progress) -> None:
    """The config's whole policy: policies and targets of its variants, then its alarms."""
    remove_variants(region, config.name, [v.name for v in config.variants], progress)
    delete_alarms(region, parts(config)[1])


def delete_alarms(region: Region, names: Iterable[str]) -> None:
    """Delete the alarms of these names that exist (DeleteAlarms refuses unknown names)."""
    wanted = sorted(set(names))
    for start in range(0, len(wanted), 100):  # both calls take at most 100 names
        chunk = wanted[start : start + 100]
        with aws_step("cloudwatch.describe_alarms"):
            found = region.cloudwatch.describe_alarms(AlarmNames=chunk).get("MetricAlarms", [])
        existing = [a["AlarmName"] for a in found]
        if existing:
            with aws_step("cloudwatch.delete_alarms"):
                region.cloudwatch.delete_alarms(AlarmNames=existing)


def _delete_policy(region: Region, rid: str, policy: str) -> None:
    tolerate_gone(
        f"application-autoscaling.delete_scaling_policy {policy}",
        region.application_autoscaling.delete_scaling_policy,
        PolicyName=policy, ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION,
    )  # fmt: skip


def _deregister(region: Region, rid: str) -> bool:
    return tolerate_gone(
        f"application-autoscaling.deregister_scalable_target {rid}",
        region.application_autoscaling.deregister_scalable_target,
        ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=SCALABLE_DIMENSION,
    )  # fmt: skip
