"""An endpoint's `autoscaling:` policy as SageMaker Application Auto Scaling calls (boto3 kwargs).

```
per scaled variant:
  application-autoscaling.register_scalable_target   endpoint/{name}/variant/{variant}, min..max
  target_tracking → application-autoscaling.put_scaling_policy   TargetTrackingScaling
  step_scaling    → for each side of the threshold that has steps (scale-out above, scale-in below):
                    application-autoscaling.put_scaling_policy   StepScaling
                    cloudwatch.put_metric_alarm                  triggers it; AlarmActions = ["${PolicyARN}"]
  min_replicas 0 (async) → application-autoscaling.put_scaling_policy   StepScaling +1 (wake from 0)
                           cloudwatch.put_metric_alarm  HasBacklogWithoutCapacity ≥ 1 triggers it
```
`params` are exactly the keyword arguments of the boto3 method named by `operation`, so
`getattr(boto3.client(call.service), call.operation)(**call.params)` runs one. An alarm always
comes right after its policy: the policy's ARN exists only once `put_scaling_policy` has
returned it (`PolicyARN` in the reply), so the alarm carries the placeholder `${PolicyARN}` in
`AlarmActions`; `with_policy_arn(call, arn)` puts the real one in.

Mapping, and where SageMaker differs from the local autoscaler (`autoscale.py`):
- concurrent_requests_per_replica → SageMakerVariantConcurrentRequestsPerModelHighResolution
  (CloudWatch ConcurrentRequestsPerModel, Average); invocations_per_replica_per_minute →
  SageMakerVariantInvocationsPerInstance (CloudWatch InvocationsPerInstance, Sum over 60 s: each
  request adds 1/instances, so the Sum is invocations per instance per minute);
  backlog_per_replica (async) → a customized metric, ApproximateBacklogSizePerInstance
  (AWS/SageMaker, dimension EndpointName only, Average), for target tracking and alarms alike.
- min_replicas 0 (async only): at 0 instances there is no per-instance backlog to track, so
  AWS's recipe for scaling from zero is added: a step policy of +1 instance behind an alarm on
  HasBacklogWithoutCapacity (Average ≥ 1 over one 60 s period), as the local autoscaler's
  wake from 0; the other policy takes over once an instance runs.
- target tracking: SageMaker chooses its own evaluation window; `lookback_s` is not exported.
  Cooldowns are rounded up to whole seconds.
- step scaling: AWS runs one policy per alarm and wants contiguous steps on one side of it, so
  the local steps are split at the threshold into a scale-out policy (alarm ≥, steps relative to
  the lowest step bound above the threshold) and a scale-in policy (alarm <, steps relative to
  the highest bound below it). Gaps between local steps (there: no change) become steps of 0;
  ExactCapacity and PercentChangeInCapacity with a MinAdjustmentMagnitude have no "no change"
  step, so a gap there is refused. The alarm averages 60 s periods over ceil(lookback_s / 60)
  of them. AWS rounds a PercentChangeInCapacity beyond ±1 replica toward zero, the local
  autoscaler away from zero.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from twinserve.deploy.policies import ScalingMetric, StepScalingPolicy, TargetTrackingPolicy
from twinserve.deploy.spec import EndpointConfig

POLICY_ARN_PLACEHOLDER = "${PolicyARN}"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
PREDEFINED_METRICS: dict[ScalingMetric, str] = {
    "concurrent_requests_per_replica": "SageMakerVariantConcurrentRequestsPerModelHighResolution",
    "invocations_per_replica_per_minute": "SageMakerVariantInvocationsPerInstance",
}
# CloudWatch metric and statistic a step-scaling alarm watches: (MetricName, Statistic)
ALARM_METRICS: dict[ScalingMetric, tuple[str, str]] = {
    "concurrent_requests_per_replica": ("ConcurrentRequestsPerModel", "Average"),
    "invocations_per_replica_per_minute": ("InvocationsPerInstance", "Sum"),
    "backlog_per_replica": ("ApproximateBacklogSizePerInstance", "Average"),
}
ALARM_PERIOD_S = 60
BACKLOG = "backlog_per_replica"
# the async metrics SageMaker publishes per endpoint (no VariantName dimension)
ENDPOINT_METRICS = frozenset({"ApproximateBacklogSizePerInstance", "HasBacklogWithoutCapacity"})
WAKE_METRIC = "HasBacklogWithoutCapacity"

_Step = tuple[float | None, float | None, int]  # (lower, upper, adjustment), None = unbounded


class SageMakerCall(BaseModel):
    """One boto3 call: `getattr(boto3.client(service), operation)(**params)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service: Literal["application-autoscaling", "cloudwatch"] = Field(description="boto3 client name.")
    operation: str = Field(
        min_length=1, description="boto3 method, e.g. register_scalable_target, put_metric_alarm."
    )
    params: dict[str, Any] = Field(description="The method's keyword arguments (AWS PascalCase names).")


def resource_id(endpoint: str, variant: str) -> str:
    """Application Auto Scaling's id of a SageMaker production variant."""
    return f"endpoint/{endpoint}/variant/{variant}"


def sagemaker_scaling_calls(
    config: EndpointConfig, *, endpoint_name: str | None = None
) -> list[SageMakerCall]:
    """The calls that give the SageMaker endpoint `endpoint_name` (default: config.name) the policy.

    Empty when the config has no `autoscaling:`. Variants in config order; only
    `autoscaling.variant` when it is set.
    """
    policy = config.autoscaling
    if policy is None:
        return []
    name = endpoint_name or config.name
    calls: list[SageMakerCall] = []
    for variant in config.variants:
        if policy.variant is not None and policy.variant != variant.name:
            continue
        calls.append(_register(name, variant.name, policy.min_replicas, policy.max_replicas))
        if isinstance(policy, TargetTrackingPolicy):
            calls.append(_target_tracking(name, variant.name, policy))
        else:
            calls += _step_scaling(name, variant.name, policy)
        if policy.min_replicas == 0:
            calls += _wake_from_zero(name, variant.name, policy)
    return calls


def with_policy_arn(call: SageMakerCall, arn: str) -> SageMakerCall:
    """`call` with `${PolicyARN}` in its AlarmActions replaced by `arn` (other calls unchanged)."""
    actions = call.params.get("AlarmActions")
    if not actions:
        return call
    params = {**call.params, "AlarmActions": [arn if a == POLICY_ARN_PLACEHOLDER else a for a in actions]}
    return call.model_copy(update={"params": params})


def _target(endpoint: str, variant: str) -> dict[str, Any]:
    return {
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id(endpoint, variant),
        "ScalableDimension": SCALABLE_DIMENSION,
    }


def _register(endpoint: str, variant: str, lo: int, hi: int) -> SageMakerCall:
    params = {**_target(endpoint, variant), "MinCapacity": lo, "MaxCapacity": hi}
    return SageMakerCall(
        service="application-autoscaling", operation="register_scalable_target", params=params
    )


def _seconds(s: float) -> int:
    return math.ceil(s)  # never shorter than asked


def _target_tracking(endpoint: str, variant: str, policy: TargetTrackingPolicy) -> SageMakerCall:
    config: dict[str, Any] = {"TargetValue": float(policy.target)}
    if policy.metric == BACKLOG:
        metric_name, statistic = ALARM_METRICS[BACKLOG]
        config["CustomizedMetricSpecification"] = {
            "MetricName": metric_name,
            "Namespace": "AWS/SageMaker",
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
            "Statistic": statistic,
        }
    else:
        config["PredefinedMetricSpecification"] = {"PredefinedMetricType": PREDEFINED_METRICS[policy.metric]}
    config |= {
        "ScaleInCooldown": _seconds(policy.scale_in_cooldown_s),
        "ScaleOutCooldown": _seconds(policy.scale_out_cooldown_s),
        "DisableScaleIn": policy.disable_scale_in,
    }
    params = {
        "PolicyName": f"{endpoint}-{variant}-target-tracking",
        **_target(endpoint, variant),
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": config,
    }
    return SageMakerCall(service="application-autoscaling", operation="put_scaling_policy", params=params)


def _step_scaling(endpoint: str, variant: str, policy: StepScalingPolicy) -> list[SageMakerCall]:
    calls: list[SageMakerCall] = []
    for side in ("out", "in"):
        steps = _side(policy, above=side == "out")
        if not steps:
            continue
        # rebase on the bound nearest the threshold: the alarm fires exactly where a step starts
        base = steps[0][0] if side == "out" else steps[-1][1]
        assert base is not None  # _side clips each side at the threshold
        steps = _contiguous([(_minus(lo, base), _minus(hi, base), adj) for lo, hi, adj in steps], policy)
        policy_name = f"{endpoint}-{variant}-step-scale-{side}"
        config: dict[str, Any] = {
            "AdjustmentType": policy.adjustment_type,
            "StepAdjustments": [_step_params(step) for step in steps],
            "Cooldown": _seconds(policy.cooldown_s),
            "MetricAggregationType": "Average",
        }
        if policy.min_adjustment_magnitude is not None:
            config["MinAdjustmentMagnitude"] = policy.min_adjustment_magnitude
        params = {
            "PolicyName": policy_name,
            **_target(endpoint, variant),
            "PolicyType": "StepScaling",
            "StepScalingPolicyConfiguration": config,
        }
        calls.append(
            SageMakerCall(service="application-autoscaling", operation="put_scaling_policy", params=params)
        )
        calls.append(_alarm(endpoint, variant, policy, policy_name, policy.threshold + base, side == "out"))
    return calls


def _side(policy: StepScalingPolicy, *, above: bool) -> list[_Step]:
    """The steps' parts on one side of the threshold (bounds relative to it), sorted."""
    inf = math.inf
    parts: list[tuple[float, float, int]] = []
    for s in policy.step_adjustments:
        lo = -inf if s.metric_interval_lower_bound is None else s.metric_interval_lower_bound
        hi = inf if s.metric_interval_upper_bound is None else s.metric_interval_upper_bound
        lo, hi = (max(lo, 0.0), hi) if above else (lo, min(hi, 0.0))
        if lo < hi:
            parts.append((lo, hi, s.scaling_adjustment))
    parts.sort()
    return [(None if lo == -inf else lo, None if hi == inf else hi, adj) for lo, hi, adj in parts]


def _minus(bound: float | None, base: float) -> float | None:
    return None if bound is None else bound - base


def _contiguous(steps: list[_Step], policy: StepScalingPolicy) -> list[_Step]:
    """Fill gaps (and an open end AWS requires) with no-change steps, where the type has one."""
    out: list[_Step] = []
    edges = [*steps]
    if edges[0][0] is not None and edges[0][0] < 0:
        edges.insert(0, (None, edges[0][0], 0))  # scale-in side: open below
    if edges[-1][1] is not None and edges[-1][1] > 0:
        edges.append((edges[-1][1], None, 0))  # scale-out side: open above
    fillers = len(edges) - len(steps)
    for step in edges:
        if out and out[-1][1] is not None and step[0] is not None and out[-1][1] < step[0]:
            out.append((out[-1][1], step[0], 0))
            fillers += 1
        out.append(step)
    if fillers and (policy.adjustment_type == "ExactCapacity" or policy.min_adjustment_magnitude is not None):
        raise ValueError(
            "SageMaker step scaling needs contiguous steps, open at the far end; a gap there would "
            f"need a no-change step, which {policy.adjustment_type} with this policy has not: "
            "make the step intervals contiguous and open-ended"
        )
    return out


def _step_params(step: _Step) -> dict[str, Any]:
    lo, hi, adj = step
    params: dict[str, Any] = {}
    if lo is not None:
        params["MetricIntervalLowerBound"] = float(lo)
    if hi is not None:
        params["MetricIntervalUpperBound"] = float(hi)
    params["ScalingAdjustment"] = adj
    return params


def _alarm(
    endpoint: str, variant: str, policy: StepScalingPolicy, policy_name: str, threshold: float, high: bool
) -> SageMakerCall:
    metric_name, statistic = ALARM_METRICS[policy.metric]
    params = {
        **_alarm_base(endpoint, variant, policy_name, metric_name),
        "Statistic": statistic,
        "Period": ALARM_PERIOD_S,
        "EvaluationPeriods": max(1, math.ceil(policy.lookback_s / ALARM_PERIOD_S)),
        "Threshold": float(threshold),
        "ComparisonOperator": "GreaterThanOrEqualToThreshold" if high else "LessThanThreshold",
        # no datapoints: SageMaker sends InvocationsPerInstance only with requests, so none
        # means no traffic, which is below a scale-in threshold and above no scale-out one
        "TreatMissingData": "notBreaching" if high else "breaching",
    }
    return SageMakerCall(service="cloudwatch", operation="put_metric_alarm", params=params)


def _alarm_base(endpoint: str, variant: str, policy_name: str, metric_name: str) -> dict[str, Any]:
    dimensions = [{"Name": "EndpointName", "Value": endpoint}]
    if metric_name not in ENDPOINT_METRICS:
        dimensions.append({"Name": "VariantName", "Value": variant})
    return {
        "AlarmName": f"{policy_name}-alarm",
        "AlarmDescription": f"Triggers the step scaling policy {policy_name} (twinserve).",
        "ActionsEnabled": True,
        "AlarmActions": [POLICY_ARN_PLACEHOLDER],
        "Namespace": "AWS/SageMaker",
        "MetricName": metric_name,
        "Dimensions": dimensions,
    }


def _wake_from_zero(
    endpoint: str, variant: str, policy: TargetTrackingPolicy | StepScalingPolicy
) -> list[SageMakerCall]:
    """AWS's scale-from-zero recipe for async endpoints: +1 instance while requests wait with none."""
    policy_name = f"{endpoint}-{variant}-has-backlog-without-capacity"
    cooldown = policy.scale_out_cooldown_s if isinstance(policy, TargetTrackingPolicy) else policy.cooldown_s
    step = {
        "PolicyName": policy_name,
        **_target(endpoint, variant),
        "PolicyType": "StepScaling",
        "StepScalingPolicyConfiguration": {
            "AdjustmentType": "ChangeInCapacity",
            "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}],
            "Cooldown": _seconds(cooldown),
            "MetricAggregationType": "Average",
        },
    }
    alarm = {
        **_alarm_base(endpoint, variant, policy_name, WAKE_METRIC),
        "Statistic": "Average",
        "Period": ALARM_PERIOD_S,
        "EvaluationPeriods": 1,
        "Threshold": 1.0,
        "ComparisonOperator": "GreaterThanOrEqualToThreshold",
        # SageMaker publishes the metric (0 or 1) per minute; none means nothing waits
        "TreatMissingData": "notBreaching",
    }
    return [
        SageMakerCall(service="application-autoscaling", operation="put_scaling_policy", params=step),
        SageMakerCall(service="cloudwatch", operation="put_metric_alarm", params=alarm),
    ]
