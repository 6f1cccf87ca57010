"""An update's blue/green `DeploymentConfig` and the alarms that roll it back (pure, checked early).

```
canary_percent  []            → ALL_AT_ONCE   (bake_s: wait before the old fleet goes)
                [10]          → CANARY 10%    (bake_s: canary held, then the rest)
                [25, 50, 75]  → LINEAR 25%    (bake_s per step)
AutoRollbackConfiguration     ← {endpoint}-{variant}-5xx-errors   Invocation5XXErrors Sum ≥ N in 1 min
                                {endpoint}-{variant}-model-latency ModelLatency Average > S in 1 min
```
SageMaker shifts traffic in whole instances of the new fleet: a canary is at most half of
it and a linear step 10–50 %, so both need ≥ 2 instances per variant; steps must be whole
percents. Other step lists (10, 50) have no SageMaker equivalent and are refused rather
than silently changed. Blue/green with guardrails also needs the same variant names in
the old and new config; otherwise SageMaker's plain update (all at once, no alarms) runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from twinserve.deploy.platform_config import SageMakerSettings
from twinserve.errors import ValidationError
from twinserve.platforms.sagemaker.names import rollback_alarm_names

MAX_WAIT_S = 3600
_PROVISION_S = 1200  # new instances: capacity, image pull, before the container starts


def traffic_routing(canary_percent: Iterable[float], bake_s: float, min_instances: int) -> dict[str, Any]:
    """TrafficRoutingConfiguration for the steps (0 and 100 are implied); ValidationError if none fits."""
    wait = math.ceil(bake_s)
    if not 0 <= wait <= MAX_WAIT_S:
        raise ValidationError(
            f"--bake {bake_s:g}s: SageMaker waits 0..{MAX_WAIT_S}s per step", param="bake_s"
        )
    steps = sorted({float(p) for p in canary_percent if 0 < float(p) < 100})
    if not steps:
        return {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": wait}
    if any(p != int(p) for p in steps):
        raise ValidationError(
            f"SageMaker canary steps are whole percents, not {steps}", param="canary_percent"
        )
    ints = [int(p) for p in steps]
    if min_instances < 2:
        raise ValidationError(
            "canary and linear traffic shifting need >= 2 instances per variant (SageMaker shifts whole "
            "instances, at most half of the new fleet at a time); scale up first or update without --canary",
            param="canary_percent",
        )
    if len(ints) == 1:
        if ints[0] > 50:
            raise ValidationError(f"a SageMaker canary is at most 50% of the new fleet, not {ints[0]}%")
        size = {"Type": "CAPACITY_PERCENT", "Value": ints[0]}
        return {"Type": "CANARY", "CanarySize": size, "WaitIntervalInSeconds": wait}
    step = ints[0]
    if ints == list(range(step, 100, step)) and 10 <= step <= 50:
        size = {"Type": "CAPACITY_PERCENT", "Value": step}
        return {"Type": "LINEAR", "LinearStepSize": size, "WaitIntervalInSeconds": wait}
    raise ValidationError(
        f"SageMaker shifts traffic as one canary (<= 50%) or in equal linear steps of 10-50% "
        f"(e.g. 25 50 75); {', '.join(map(str, ints))} is neither",
        param="canary_percent",
    )


def execution_timeout(
    settings: SageMakerSettings, routing: dict[str, Any], start_s: int, termination_wait_s: int
) -> int:
    """MaximumExecutionTimeoutInSeconds: provisioning, start-up, every bake, the final wait."""
    if settings.max_execution_timeout_s is not None:
        return settings.max_execution_timeout_s
    wait = int(routing["WaitIntervalInSeconds"])
    shifts = {"ALL_AT_ONCE": 1, "CANARY": 2}.get(routing["Type"])
    if shifts is None:
        shifts = math.ceil(100 / routing["LinearStepSize"]["Value"])
    total = _PROVISION_S + start_s + shifts * wait + termination_wait_s + 600
    return int(min(28800, max(600, total)))


def deployment_config(
    routing: dict[str, Any], alarms: list[str], *, termination_wait_s: int, execution_timeout_s: int
) -> dict[str, Any]:
    """UpdateEndpoint's DeploymentConfig: blue/green with the routing, rolled back by the alarms."""
    config: dict[str, Any] = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": termination_wait_s,
            "MaximumExecutionTimeoutInSeconds": execution_timeout_s,
        }
    }
    if alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in alarms]}
    return config


def rollback_alarms(endpoint: str, variant: str, settings: SageMakerSettings) -> list[dict[str, Any]]:
    """put_metric_alarm kwargs of the variant's two rollback alarms (no actions: SageMaker watches them)."""
    errors, latency = rollback_alarm_names(endpoint, variant)
    common = {
        "Namespace": "AWS/SageMaker",
        "Dimensions": [
            {"Name": "EndpointName", "Value": endpoint},
            {"Name": "VariantName", "Value": variant},
        ],
        "Period": 60,
        "EvaluationPeriods": 1,
        "DatapointsToAlarm": 1,
        "TreatMissingData": "notBreaching",  # no traffic during a bake is not a failure
        "ActionsEnabled": False,
    }
    return [
        {
            "AlarmName": errors,
            "AlarmDescription": f"twinserve: {endpoint}/{variant} answers 5xx; rolls an update back.",
            "MetricName": "Invocation5XXErrors",
            "Statistic": "Sum",
            "Threshold": float(settings.rollback_5xx_errors),
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            **common,
        },
        {
            "AlarmName": latency,
            "AlarmDescription": f"twinserve: {endpoint}/{variant} model latency is high; rolls an update back.",
            "MetricName": "ModelLatency",  # microseconds
            "Statistic": "Average",
            "Threshold": float(settings.rollback_latency_s * 1_000_000),
            "ComparisonOperator": "GreaterThanThreshold",
            **common,
        },
    ]
