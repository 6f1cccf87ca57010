"""Async SageMaker endpoints on moto: AsyncInferenceConfig, refusals before AWS, backlog autoscaling from 0."""

from __future__ import annotations

import io
import re
from typing import Any

import boto3
import pytest
from rich.console import Console

from tests.unit.platforms.sagemaker.conftest import (
    NOTHING,
    REGION,
    ROLE,
    Calls,
    aws_inventory,
    emulate_update_endpoint,
    sm_config,
)
from tests.unit.platforms.sagemaker.test_scaling import _check_enums
from twinserve.deploy.spec import EndpointConfig, EndpointStatus
from twinserve.errors import ValidationError
from twinserve.platforms.sagemaker.platform import SageMakerPlatform
from twinserve.platforms.sagemaker.scaling import sagemaker_scaling_calls, with_policy_arn

SUCCESS_TOPIC = "arn:aws:sns:us-east-1:123456789012:twin-done"
ERROR_TOPIC = "arn:aws:sns:us-east-1:123456789012:twin-failed"
BACKLOG = {
    "type": "target_tracking", "metric": "backlog_per_replica", "target": 5, "min_replicas": 0,
    "max_replicas": 4, "scale_out_cooldown_s": 120,
}  # fmt: skip
WAKE = "twin-primary-has-backlog-without-capacity"

YAML = f"""
name: twin
variants:
  - model: models:/tiny-llm@champion
    replicas: 1
autoscaling: {{type: target_tracking, metric: backlog_per_replica, target: 5, min_replicas: 0, max_replicas: 4}}
async:
  max_concurrent_invocations_per_replica: 4
  output_location: s3://twin-results/answers
  success_topic_arn: {SUCCESS_TOPIC}
  error_topic_arn: {ERROR_TOPIC}
  request_ttl_s: 600
platform:
  type: sagemaker
  sagemaker: {{role_arn: "{ROLE}", instance_type: ml.g4dn.xlarge}}
"""


def async_config(
    autoscaling: dict[str, Any] | None = None, model: str = "models:/tiny-llm@champion", **spec: Any
) -> EndpointConfig:
    """sm_config() with an `async:` block (output to s3://twin-results/answers unless given)."""
    spec = {"output_location": "s3://twin-results/answers", **spec}
    return sm_config(model=model, autoscaling=autoscaling, asynchronous=spec)


def test_yaml_async_endpoint_gets_async_inference_config(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    ep = platform.create(EndpointConfig.from_yaml(YAML))

    assert ep.status is EndpointStatus.IN_SERVICE
    expected = {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4},
        "OutputConfig": {
            "S3OutputPath": "s3://twin-results/answers",
            "S3FailurePath": "s3://twin-results/answers/failures",  # the local default, failures/ under it
            "NotificationConfig": {"SuccessTopic": SUCCESS_TOPIC, "ErrorTopic": ERROR_TOPIC},
        },
    }
    (config,) = calls.params("CreateEndpointConfig")
    assert config["AsyncInferenceConfig"] == expected
    assert [v["VariantName"] for v in config["ProductionVariants"]] == ["primary"]
    # what AWS (moto) keeps is what was sent
    described = session.client("sagemaker").describe_endpoint_config(EndpointConfigName="twin-g1")
    assert described["AsyncInferenceConfig"] == expected
    assert ep.url == f"https://runtime.sagemaker.{REGION}.amazonaws.com/endpoints/twin/async-invocations"
    stored = platform.store.get_endpoint("twin").config.async_inference
    assert stored is not None and stored.success_topic_arn == SUCCESS_TOPIC and stored.request_ttl_s == 600


def test_describe_shows_the_async_config(platform: SageMakerPlatform) -> None:
    from twinserve.cli.endpoint_view import render_endpoint

    platform.create(async_config(failure_location="s3://twin-errors/x", success_topic_arn=SUCCESS_TOPIC))
    ep = platform.describe("twin")
    assert {k: v for k, v in ep.resources.items() if k.startswith("async.")} == {
        "async.output_path": "s3://twin-results/answers",
        "async.failure_path": "s3://twin-errors/x",
        "async.max_concurrent_invocations_per_instance": "8",
        "async.success_topic": SUCCESS_TOPIC,
    }
    out = Console(file=io.StringIO(), width=200)
    render_endpoint(out, ep, platform, [])
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert "s3://twin-results/answers" in text and SUCCESS_TOPIC in text and "async-invocations" in text


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"output_location": None}, "needs async.output_location: s3://BUCKET/PREFIX"),
        ({"output_location": "file:///srv/answers"}, "async.output_location is 'file:///srv/answers'"),
        ({"output_location": "/srv/answers"}, "SageMaker writes async results to S3"),
        ({"output_location": "s3://Not_A_Bucket/x"}, "async.output_location is 's3://Not_A_Bucket/x'"),
        ({"failure_location": "file:///srv/errors"}, "async.failure_location is 'file:///srv/errors'"),
        (
            {"notify_success_url": "https://hooks.example.com/ok"},
            "async.notify_success_url: SageMaker cannot",
        ),
        (
            {"notify_error_url": "https://a.example/ko", "notify_secret": "k"},
            "async.notify_error_url: SageMaker",
        ),
    ],
    ids=[
        "no-output",
        "file-output",
        "path-output",
        "bad-bucket",
        "file-failure",
        "success-hook",
        "error-hook",
    ],
)
def test_what_sagemaker_cannot_do_fails_before_any_aws_call(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session, spec: dict[str, Any], error: str
) -> None:
    config = async_config(**spec)
    with pytest.raises(ValidationError, match=re.escape(error)) as caught:
        platform.create(config)
    if "notify" in error:
        assert "use async.success_topic_arn / async.error_topic_arn" in caught.value.message
    assert calls.names() == []  # not even a describe: the check is pure
    assert platform.store.list_endpoints() == [] and aws_inventory(session) == NOTHING


def test_topic_arns_are_checked_and_local_configs_may_carry_them() -> None:
    with pytest.raises(ValueError, match="an SNS topic is arn:aws:sns:REGION:ACCOUNT:NAME"):
        async_config(success_topic_arn="arn:aws:sqs:us-east-1:123456789012:q")
    local = EndpointConfig.model_validate(
        {"name": "twin", "variants": [{"model": "models:/tiny-llm@champion"}],
         "async": {"error_topic_arn": ERROR_TOPIC}}
    )  # fmt: skip
    assert local.platform.type == "local" and local.async_inference is not None


def test_backlog_autoscaling_from_zero_is_created_and_deleted(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    ep = platform.create(async_config(BACKLOG))

    aas = session.client("application-autoscaling")
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/twin/variant/primary", 0, 4,
    )  # fmt: skip
    policies = {
        p["PolicyName"]: p
        for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    }
    assert sorted(policies) == [WAKE, "twin-primary-target-tracking"]
    tracking = policies["twin-primary-target-tracking"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["CustomizedMetricSpecification"] == {
        "MetricName": "ApproximateBacklogSizePerInstance",
        "Namespace": "AWS/SageMaker",
        "Dimensions": [{"Name": "EndpointName", "Value": "twin"}],
        "Statistic": "Average",
    }
    assert tracking["TargetValue"] == 5.0 and "PredefinedMetricSpecification" not in tracking
    assert policies[WAKE]["PolicyType"] == "StepScaling"
    assert policies[WAKE]["StepScalingPolicyConfiguration"] == {
        "AdjustmentType": "ChangeInCapacity",
        "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}],
        "Cooldown": 120,
        "MetricAggregationType": "Average",
    }
    (alarm,) = session.client("cloudwatch").describe_alarms()["MetricAlarms"]
    assert alarm["AlarmName"] == f"{WAKE}-alarm"
    assert alarm["AlarmActions"] == [policies[WAKE]["PolicyARN"]]
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == (
        "AWS/SageMaker", "HasBacklogWithoutCapacity", "Average",
    )  # fmt: skip
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "twin"}]
    assert (alarm["Period"], alarm["EvaluationPeriods"], alarm["Threshold"]) == (60, 1, 1.0)
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert ep.resources["alarms"] == f"{WAKE}-alarm"  # recorded, so a delete after a crash finds it

    assert platform.delete("twin") is True
    assert aws_inventory(session) == NOTHING


def test_step_scaling_on_backlog_watches_the_endpoint_metric(
    platform: SageMakerPlatform, session: boto3.Session
) -> None:
    step = {
        "type": "step_scaling", "metric": "backlog_per_replica", "threshold": 10, "min_replicas": 0,
        "max_replicas": 3, "cooldown_s": 30,
        "step_adjustments": [
            {"metric_interval_upper_bound": -8, "scaling_adjustment": -1},
            {"metric_interval_lower_bound": 0, "scaling_adjustment": 1},
        ],
    }  # fmt: skip
    platform.create(async_config(step))
    alarms = {a["AlarmName"]: a for a in session.client("cloudwatch").describe_alarms()["MetricAlarms"]}
    assert sorted(alarms) == [
        f"{WAKE}-alarm",
        "twin-primary-step-scale-in-alarm",
        "twin-primary-step-scale-out-alarm",
    ]
    out = alarms["twin-primary-step-scale-out-alarm"]
    assert (out["MetricName"], out["Statistic"], out["Threshold"]) == (
        "ApproximateBacklogSizePerInstance", "Average", 10.0,
    )  # fmt: skip
    assert out["Dimensions"] == [{"Name": "EndpointName", "Value": "twin"}]  # no VariantName for it
    platform.delete("twin")
    assert aws_inventory(session) == NOTHING


@pytest.mark.parametrize("policy", [BACKLOG, {**BACKLOG, "min_replicas": 1}], ids=["from-0", "from-1"])
def test_backlog_calls_validate_against_botocore_models(policy: dict[str, Any]) -> None:
    import botocore.session
    from botocore import xform_name
    from botocore.validate import validate_parameters

    bc = botocore.session.get_session()
    calls = sagemaker_scaling_calls(async_config(policy))
    assert any(c.params.get("PolicyName") == WAKE for c in calls) is (policy["min_replicas"] == 0)
    for call in calls:
        model = bc.get_service_model(call.service)
        op = model.operation_model({xform_name(n): n for n in model.operation_names}[call.operation])
        params = with_policy_arn(call, "arn:aws:autoscaling:us-east-1:123456789012:scalingPolicy:x").params
        validate_parameters(params, op.input_shape)
        _check_enums(params, op.input_shape)


def test_a_real_time_endpoint_is_unchanged(platform: SageMakerPlatform, calls: Calls) -> None:
    policy = {"type": "target_tracking", "target": 4, "min_replicas": 1, "max_replicas": 3}
    ep = platform.create(sm_config(autoscaling=policy))
    (config,) = calls.params("CreateEndpointConfig")
    assert "AsyncInferenceConfig" not in config
    assert not any(k.startswith("async.") for k in ep.resources) and ep.url is not None
    assert ep.url.endswith("/endpoints/twin/invocations")
    (put,) = calls.params("PutScalingPolicy")
    assert "PredefinedMetricSpecification" in put["TargetTrackingScalingPolicyConfiguration"]
    assert calls.params("PutMetricAlarm") == []
    with pytest.raises(ValidationError, match="at least 1 instance"):
        platform.scale("twin", 0)
    with pytest.raises(ValueError, match="min_replicas must be >= 1 for a real-time endpoint"):
        sm_config(autoscaling={**policy, "min_replicas": 0})


def test_update_keeps_it_async_and_scale_reaches_zero(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    platform.create(async_config(BACKLOG))
    with pytest.raises(ValidationError, match="is async; an update keeps it so"):
        platform.update("twin", sm_config(model="models:/tiny-llm/2"))
    assert len(calls.params("CreateModel")) == 1  # refused before anything new was made
    emulate_update_endpoint(calls)
    target = async_config(BACKLOG, model="models:/tiny-llm/2", output_location="s3://twin-results/v2")
    ep = platform.update("twin", target)
    assert ep.generation == 2 and ep.resources["async.output_path"] == "s3://twin-results/v2"
    assert not any(k.startswith("target.") for k in ep.resources)
    second = calls.params("CreateEndpointConfig")[1]
    assert second["AsyncInferenceConfig"]["OutputConfig"]["S3OutputPath"] == "s3://twin-results/v2"
    assert WAKE in aws_inventory(session)["scaling_policies"]  # re-applied after the commit

    ep = platform.scale("twin", 0)
    assert calls.params("UpdateEndpointWeightsAndCapacities")[-1]["DesiredWeightsAndCapacities"] == [
        {"VariantName": "primary", "DesiredInstanceCount": 0}
    ]
    assert [v.desired_replicas for v in ep.variants] == [0]
    platform.delete("twin")
    assert aws_inventory(session) == NOTHING


def test_a_real_time_endpoint_does_not_become_async(platform: SageMakerPlatform, calls: Calls) -> None:
    platform.create(sm_config())
    with pytest.raises(ValidationError, match="is real-time; an update keeps it so"):
        platform.update("twin", async_config())
    assert len(calls.params("CreateEndpointConfig")) == 1


def test_autoscale_on_and_off_adds_and_removes_the_wake_policy(
    platform: SageMakerPlatform, session: boto3.Session
) -> None:
    from twinserve.deploy.policies import TargetTrackingPolicy

    platform.create(async_config())
    ep = platform.set_autoscaling("twin", TargetTrackingPolicy.model_validate(BACKLOG))
    inventory = aws_inventory(session)
    assert sorted(inventory["scaling_policies"]) == [WAKE, "twin-primary-target-tracking"]
    assert inventory["alarms"] == [f"{WAKE}-alarm"] and ep.resources["alarms"] == f"{WAKE}-alarm"
    # the same policy from 1: the wake-from-0 policy and its alarm go, target tracking stays
    ep = platform.set_autoscaling("twin", TargetTrackingPolicy.model_validate({**BACKLOG, "min_replicas": 1}))
    inventory = aws_inventory(session)
    assert inventory["scaling_policies"] == ["twin-primary-target-tracking"] and inventory["alarms"] == []
    assert ep.resources["alarms"] == ""
    platform.set_autoscaling("twin", None)
    inventory = aws_inventory(session)
    assert inventory["scalable_targets"] == [] and inventory["scaling_policies"] == []
    assert inventory["endpoints"] == ["twin"]
