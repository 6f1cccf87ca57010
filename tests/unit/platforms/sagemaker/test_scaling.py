"""The autoscaling policy as SageMaker Application Auto Scaling / CloudWatch calls: shapes, names, validity."""

from __future__ import annotations

from typing import Any

import pytest

from twinserve.deploy.spec import EndpointConfig
from twinserve.platforms.sagemaker.scaling import (
    POLICY_ARN_PLACEHOLDER,
    SageMakerCall,
    resource_id,
    sagemaker_scaling_calls,
    with_policy_arn,
)

STEPS = [
    {"metric_interval_upper_bound": -3, "scaling_adjustment": -1},
    {"metric_interval_lower_bound": 0, "metric_interval_upper_bound": 5, "scaling_adjustment": 1},
    {"metric_interval_lower_bound": 5, "scaling_adjustment": 3},
]


def config(
    autoscaling: dict[str, Any] | None, *, variants: tuple[str, ...] = ("blue", "green")
) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": "twin",
            "variants": [{"name": v, "model": "models:/llm-twin@champion", "replicas": 2} for v in variants],
            "autoscaling": autoscaling,
        }
    )


def target_tracking(**kw: Any) -> dict[str, Any]:
    return {"type": "target_tracking", "target": 4, "min_replicas": 1, "max_replicas": 6, **kw}


def step_scaling(**kw: Any) -> dict[str, Any]:
    base = {"type": "step_scaling", "threshold": 5, "max_replicas": 6, "lookback_s": 120, "cooldown_s": 45}
    return {**base, "step_adjustments": STEPS, **kw}


def ops(calls: list[SageMakerCall]) -> list[str]:
    return [c.operation for c in calls]


def test_no_policy_no_calls() -> None:
    assert sagemaker_scaling_calls(config(None)) == []


def test_resource_id() -> None:
    assert resource_id("twin", "blue") == "endpoint/twin/variant/blue"


def test_target_tracking_concurrency() -> None:
    calls = sagemaker_scaling_calls(config(target_tracking(scale_in_cooldown_s=300.5)))
    assert ops(calls) == ["register_scalable_target", "put_scaling_policy"] * 2
    register, policy = calls[0], calls[1]
    assert register.service == "application-autoscaling"
    assert register.params == {
        "ServiceNamespace": "sagemaker",
        "ResourceId": "endpoint/twin/variant/blue",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        "MinCapacity": 1,
        "MaxCapacity": 6,
    }
    assert policy.params == {
        "PolicyName": "twin-blue-target-tracking",
        "ServiceNamespace": "sagemaker",
        "ResourceId": "endpoint/twin/variant/blue",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": 4.0,
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantConcurrentRequestsPerModelHighResolution"
            },
            "ScaleInCooldown": 301,
            "ScaleOutCooldown": 60,
            "DisableScaleIn": False,
        },
    }
    assert calls[2].params["ResourceId"] == "endpoint/twin/variant/green"


def test_target_tracking_invocations_and_name_override() -> None:
    policy = target_tracking(metric="invocations_per_replica_per_minute", target=70, disable_scale_in=True)
    calls = sagemaker_scaling_calls(config(policy), endpoint_name="twin-prod")
    cfg = calls[1].params["TargetTrackingScalingPolicyConfiguration"]
    assert cfg["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
    }
    assert cfg["TargetValue"] == 70.0 and cfg["DisableScaleIn"] is True
    assert {c.params["ResourceId"] for c in calls} == {
        "endpoint/twin-prod/variant/blue",
        "endpoint/twin-prod/variant/green",
    }


def test_policy_variant_exports_only_that_variant() -> None:
    calls = sagemaker_scaling_calls(config(target_tracking(variant="green")))
    assert {c.params["ResourceId"] for c in calls} == {"endpoint/twin/variant/green"}


def test_step_scaling_splits_at_the_threshold() -> None:
    calls = sagemaker_scaling_calls(config(step_scaling(), variants=("blue",)))
    assert [(c.service, c.operation) for c in calls] == [
        ("application-autoscaling", "register_scalable_target"),
        ("application-autoscaling", "put_scaling_policy"),
        ("cloudwatch", "put_metric_alarm"),
        ("application-autoscaling", "put_scaling_policy"),
        ("cloudwatch", "put_metric_alarm"),
    ]
    out, out_alarm, in_, in_alarm = calls[1:]
    assert out.params["PolicyName"] == "twin-blue-step-scale-out"
    assert out.params["PolicyType"] == "StepScaling"
    assert out.params["StepScalingPolicyConfiguration"] == {
        "AdjustmentType": "ChangeInCapacity",
        "StepAdjustments": [
            {"MetricIntervalLowerBound": 0.0, "MetricIntervalUpperBound": 5.0, "ScalingAdjustment": 1},
            {"MetricIntervalLowerBound": 5.0, "ScalingAdjustment": 3},
        ],
        "Cooldown": 45,
        "MetricAggregationType": "Average",
    }
    assert out_alarm.params == {
        "AlarmName": "twin-blue-step-scale-out-alarm",
        "AlarmDescription": "Triggers the step scaling policy twin-blue-step-scale-out (twinserve).",
        "ActionsEnabled": True,
        "AlarmActions": [POLICY_ARN_PLACEHOLDER],
        "Namespace": "AWS/SageMaker",
        "MetricName": "ConcurrentRequestsPerModel",
        "Dimensions": [{"Name": "EndpointName", "Value": "twin"}, {"Name": "VariantName", "Value": "blue"}],
        "Statistic": "Average",
        "Period": 60,
        "EvaluationPeriods": 2,
        "Threshold": 5.0,
        "ComparisonOperator": "GreaterThanOrEqualToThreshold",
        "TreatMissingData": "notBreaching",
    }
    # below: (-inf, -3) rebased on -3, so the alarm fires at 5 - 3 = 2
    assert in_.params["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalUpperBound": 0.0, "ScalingAdjustment": -1}
    ]
    assert in_alarm.params["Threshold"] == 2.0
    assert in_alarm.params["ComparisonOperator"] == "LessThanThreshold"
    assert in_alarm.params["TreatMissingData"] == "breaching"


def test_step_gaps_and_open_ends_become_no_change_steps() -> None:
    steps = [
        {"metric_interval_lower_bound": 1, "metric_interval_upper_bound": 2, "scaling_adjustment": 1},
        {"metric_interval_lower_bound": 3, "metric_interval_upper_bound": 6, "scaling_adjustment": 2},
    ]
    policy = step_scaling(
        step_adjustments=steps, metric="invocations_per_replica_per_minute", threshold=100, lookback_s=30
    )
    calls = sagemaker_scaling_calls(config(policy, variants=("blue",)))
    assert ops(calls) == ["register_scalable_target", "put_scaling_policy", "put_metric_alarm"]
    assert calls[1].params["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalLowerBound": 0.0, "MetricIntervalUpperBound": 1.0, "ScalingAdjustment": 1},
        {"MetricIntervalLowerBound": 1.0, "MetricIntervalUpperBound": 2.0, "ScalingAdjustment": 0},
        {"MetricIntervalLowerBound": 2.0, "MetricIntervalUpperBound": 5.0, "ScalingAdjustment": 2},
        {"MetricIntervalLowerBound": 5.0, "ScalingAdjustment": 0},
    ]
    alarm = calls[2].params
    assert (alarm["MetricName"], alarm["Statistic"]) == ("InvocationsPerInstance", "Sum")
    assert alarm["Threshold"] == 101.0 and alarm["EvaluationPeriods"] == 1


def test_step_spanning_the_threshold_goes_to_both_policies() -> None:
    steps = [{"scaling_adjustment": 1}]
    calls = sagemaker_scaling_calls(config(step_scaling(step_adjustments=steps), variants=("blue",)))
    out, in_ = calls[1], calls[3]
    assert out.params["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}
    ]
    assert in_.params["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalUpperBound": 0.0, "ScalingAdjustment": 1}
    ]


def test_percent_step_keeps_min_adjustment_magnitude() -> None:
    steps = [{"metric_interval_lower_bound": 0, "scaling_adjustment": 50}]
    policy = step_scaling(
        step_adjustments=steps, adjustment_type="PercentChangeInCapacity", min_adjustment_magnitude=2
    )
    (_, policy_call, _) = sagemaker_scaling_calls(config(policy, variants=("blue",)))
    cfg = policy_call.params["StepScalingPolicyConfiguration"]
    assert cfg["AdjustmentType"] == "PercentChangeInCapacity" and cfg["MinAdjustmentMagnitude"] == 2


def test_exact_capacity_with_a_gap_is_refused() -> None:
    steps = [
        {"metric_interval_lower_bound": 0, "metric_interval_upper_bound": 2, "scaling_adjustment": 3},
        {"metric_interval_lower_bound": 4, "scaling_adjustment": 6},
    ]
    policy = step_scaling(step_adjustments=steps, adjustment_type="ExactCapacity")
    with pytest.raises(ValueError, match="contiguous"):
        sagemaker_scaling_calls(config(policy))


def test_with_policy_arn() -> None:
    calls = sagemaker_scaling_calls(config(step_scaling(), variants=("blue",)))
    alarm = with_policy_arn(calls[2], "arn:aws:autoscaling:policy/x")
    assert alarm.params["AlarmActions"] == ["arn:aws:autoscaling:policy/x"]
    assert calls[2].params["AlarmActions"] == [POLICY_ARN_PLACEHOLDER]  # the original is unchanged
    assert with_policy_arn(calls[1], "arn") is calls[1]


ALL_CONFIGS = [
    target_tracking(),
    target_tracking(metric="invocations_per_replica_per_minute", disable_scale_in=True),
    step_scaling(),
    step_scaling(adjustment_type="PercentChangeInCapacity", min_adjustment_magnitude=1),
    step_scaling(
        adjustment_type="ExactCapacity",
        step_adjustments=[
            {"metric_interval_upper_bound": 0, "scaling_adjustment": 1},
            {"metric_interval_lower_bound": 0, "scaling_adjustment": 6},
        ],
    ),
]


@pytest.mark.parametrize(
    "policy",
    ALL_CONFIGS,
    ids=["concurrency", "invocations", "step-change", "step-percent", "step-exact"],
)
def test_params_validate_against_botocore_models(policy: dict[str, Any]) -> None:
    import botocore.session as botocore_session  # [dev] extra (via boto3): missing fails, not skips
    from botocore import xform_name
    from botocore.validate import validate_parameters

    session = botocore_session.get_session()
    for call in sagemaker_scaling_calls(config(policy)):
        model = session.get_service_model(call.service)
        operations = {xform_name(name): name for name in model.operation_names}
        op = model.operation_model(operations[call.operation])
        params = with_policy_arn(call, "arn:aws:autoscaling:us-east-1:123456789012:scalingPolicy:x").params
        validate_parameters(params, op.input_shape)  # raises ParamValidationError
        # the validator does not check enums: do it for the values we choose
        _check_enums(params, op.input_shape)


def _check_enums(value: Any, shape: Any) -> None:
    if shape.type_name == "structure":
        for key, member in value.items():
            _check_enums(member, shape.members[key])
    elif shape.type_name == "list":
        for item in value:
            _check_enums(item, shape.member)
    elif shape.type_name == "string" and shape.enum:
        assert value in shape.enum, f"{value!r} is not one of {shape.name}'s {shape.enum}"


def test_calls_run_against_moto() -> None:
    """The calls fed to boto3 as docs/autoscaling.md shows (moto fakes AWS)."""
    import boto3  # [dev] extra: missing is a failure, not a skip
    import moto

    with moto.mock_aws():
        clients = {
            s: boto3.client(s, region_name="us-east-1") for s in ("application-autoscaling", "cloudwatch")
        }
        arn = ""
        for call in sagemaker_scaling_calls(config(step_scaling())):
            reply = getattr(clients[call.service], call.operation)(**with_policy_arn(call, arn).params)
            if call.operation == "put_scaling_policy":
                arn = reply["PolicyARN"]
        policies = clients["application-autoscaling"].describe_scaling_policies(ServiceNamespace="sagemaker")
        alarms = clients["cloudwatch"].describe_alarms()["MetricAlarms"]
    by_name = {p["PolicyName"]: p["PolicyARN"] for p in policies["ScalingPolicies"]}
    assert len(by_name) == 4  # 2 variants x (scale-out, scale-in)
    assert {a["AlarmName"]: a["AlarmActions"] for a in alarms} == {
        f"{name}-alarm": [policy_arn] for name, policy_arn in by_name.items()
    }
