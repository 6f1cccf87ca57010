"""SageMakerPlatform on moto: create → describe → update (blue/green) → scale → autoscaling → delete."""

from __future__ import annotations

import time
from typing import Any

import boto3
import pytest

from tests.unit.platforms.sagemaker.conftest import (
    NOTHING,
    REGION,
    ROLE,
    Calls,
    aws_inventory,
    emulate_update_endpoint,
    sm_config,
)
from twinserve.deploy.platform import Platform
from twinserve.deploy.policies import StepScalingPolicy, TargetTrackingPolicy
from twinserve.deploy.spec import EndpointStatus
from twinserve.errors import ConflictError, UpdateRolledBackError, ValidationError
from twinserve.platforms.sagemaker.images import dlc_image
from twinserve.platforms.sagemaker.platform import SageMakerPlatform

TARGET_TRACKING = {"type": "target_tracking", "target": 4, "min_replicas": 2, "max_replicas": 4}


def test_is_a_platform(platform: SageMakerPlatform) -> None:
    assert isinstance(platform, Platform)
    assert platform.name == "sagemaker"
    assert platform.capabilities.native_autoscaling and platform.capabilities.runtime_api
    assert platform.capabilities.scale_to_zero  # async endpoints only (test_async.py)


def test_create_makes_model_config_endpoint_and_autoscaling(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    said: list[str] = []
    ep = platform.create(sm_config(replicas=2, autoscaling=TARGET_TRACKING), progress=said.append)

    assert ep.status is EndpointStatus.IN_SERVICE and ep.generation == 1
    assert ep.url == f"https://runtime.sagemaker.{REGION}.amazonaws.com/endpoints/twin/invocations"
    assert [(v.name, v.desired_replicas, v.current_replicas) for v in ep.variants] == [("primary", 2, 2)]
    pinned = ep.config.variants[0].pinned
    assert pinned is not None and (pinned.name, pinned.version) == ("tiny-llm", 1)
    settings = ep.config.platform.sagemaker
    assert settings is not None and settings.region == REGION and settings.role_arn == ROLE
    image = dlc_image(REGION)
    assert ep.resources["image"] == image and ep.resources["pinned.primary"].startswith("tiny-llm/1")
    assert (ep.resources["model.primary"], ep.resources["endpoint_config"]) == ("twin-g1-primary", "twin-g1")
    # the exact calls, in order (moto checks none of their parameters)
    assert [n for n in calls.mutating() if not n.startswith("Put")] == [
        "CreateBucket", "CreateModel", "CreateEndpointConfig", "CreateEndpoint", "RegisterScalableTarget",
    ]  # fmt: skip
    (model,) = calls.params("CreateModel")
    data = ep.resources["model_data.primary"]
    assert data.startswith(f"s3://sagemaker-{REGION}-123456789012/twinserve/models/{pinned.content_sha256}/")
    assert model["PrimaryContainer"]["ModelDataSource"] == {
        "S3DataSource": {"S3Uri": data, "S3DataType": "S3Prefix", "CompressionType": "None"}
    }
    env = model["PrimaryContainer"]["Environment"]
    assert model["PrimaryContainer"]["Image"] == image and model["ExecutionRoleArn"] == ROLE
    assert env["HF_MODEL_ID"] == "/opt/ml/model" and env["SM_NUM_GPUS"] == "1"
    assert env["MESSAGES_API_ENABLED"] == "true" and env["DTYPE"] == "float16"  # a T4 has no bfloat16
    assert int(env["MAX_INPUT_TOKENS"]) < int(env["MAX_TOTAL_TOKENS"]) <= int(env["MAX_BATCH_TOTAL_TOKENS"])
    assert "MAX_INPUT_LENGTH" not in env  # TGI >= 2 refuses it beside MAX_INPUT_TOKENS
    assert "HF_TOKEN" not in env and "HF_MODEL_REVISION" not in env
    (config,) = calls.params("CreateEndpointConfig")
    assert config["ProductionVariants"] == [
        {
            "VariantName": "primary", "ModelName": "twin-g1-primary", "InstanceType": "ml.g4dn.xlarge",
            "InitialInstanceCount": 2, "InitialVariantWeight": 1.0,
            "ModelDataDownloadTimeoutInSeconds": 600, "ContainerStartupHealthCheckTimeoutInSeconds": 600,
        }
    ]  # fmt: skip
    assert {"Key": "twinserve:endpoint", "Value": "twin"} in config["Tags"]
    assert calls.params("RegisterScalableTarget") == [
        {
            "ServiceNamespace": "sagemaker", "ResourceId": "endpoint/twin/variant/primary",
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount", "MinCapacity": 2, "MaxCapacity": 4,
        }
    ]  # fmt: skip
    assert any("InService" in line for line in said) and any("uploaded" in line for line in said)
    inventory = aws_inventory(session)
    assert inventory["endpoints"] == ["twin"] and inventory["scaling_policies"] == [
        "twin-primary-target-tracking"
    ]


def test_describe_refreshes_from_sagemaker(platform: SageMakerPlatform, session: boto3.Session) -> None:
    platform.create(sm_config())
    session.client("sagemaker").update_endpoint_weights_and_capacities(
        EndpointName="twin",
        DesiredWeightsAndCapacities=[{"VariantName": "primary", "DesiredInstanceCount": 3}],
    )  # e.g. autoscaling moved it
    ep = platform.describe("twin")
    assert [(v.desired_replicas, v.current_replicas) for v in ep.variants] == [(3, 3)]
    assert ep.resources["live_endpoint_config"] == "twin-g1"
    assert [e.name for e in platform.list_endpoints()] == ["twin"]
    with pytest.raises(ConflictError):
        platform.create(sm_config())


def test_update_is_blue_green_with_canary_and_auto_rollback(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    platform.create(sm_config(replicas=2, autoscaling=TARGET_TRACKING))
    emulate_update_endpoint(calls)
    said: list[str] = []
    ep = platform.update(
        "twin", sm_config(model="models:/tiny-llm/2", replicas=2, autoscaling=TARGET_TRACKING),
        canary_percent=[10], bake_s=300, progress=said.append,
    )  # fmt: skip

    (update,) = calls.params("UpdateEndpoint")
    assert update == {
        "EndpointName": "twin",
        "EndpointConfigName": "twin-g2",
        "DeploymentConfig": {
            "BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": {
                    "Type": "CANARY",
                    "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10},
                    "WaitIntervalInSeconds": 300,
                },
                "TerminationWaitInSeconds": 0,
                "MaximumExecutionTimeoutInSeconds": 1200 + 1200 + 2 * 300 + 600,
            },
            "AutoRollbackConfiguration": {
                "Alarms": [
                    {"AlarmName": "twin-primary-5xx-errors"},
                    {"AlarmName": "twin-primary-model-latency"},
                ]
            },
        },
    }
    alarms = {a["AlarmName"]: a for a in calls.params("PutMetricAlarm")}
    assert alarms["twin-primary-5xx-errors"]["MetricName"] == "Invocation5XXErrors"
    assert alarms["twin-primary-5xx-errors"]["Dimensions"] == [
        {"Name": "EndpointName", "Value": "twin"}, {"Name": "VariantName", "Value": "primary"},
    ]  # fmt: skip
    assert alarms["twin-primary-model-latency"]["Threshold"] == 30_000_000  # microseconds
    assert ep.status is EndpointStatus.IN_SERVICE and ep.generation == 2 and ep.target is None
    pinned = ep.config.variants[0].pinned
    assert pinned is not None and pinned.version == 2
    assert (ep.resources["endpoint_config"], ep.resources["model.primary"]) == ("twin-g2", "twin-g2-primary")
    assert not any(k.startswith("target.") for k in ep.resources)
    inventory = aws_inventory(session)
    # generation 1 is gone once generation 2 serves; autoscaling kept (same instance type)
    assert inventory["models"] == ["twin-g2-primary"] and inventory["endpoint_configs"] == ["twin-g2"]
    assert inventory["scalable_targets"] == ["endpoint/twin/variant/primary"]
    assert "DeregisterScalableTarget" not in calls.names()
    assert any("canary" in line for line in said)


def test_update_linear_and_all_at_once(platform: SageMakerPlatform, calls: Calls) -> None:
    platform.create(sm_config(replicas=4))
    emulate_update_endpoint(calls)
    platform.update(
        "twin", sm_config(model="models:/tiny-llm/2", replicas=4), canary_percent=[25, 50, 75], bake_s=60
    )
    platform.update("twin", sm_config(replicas=1), bake_s=0)
    first, second = (u["DeploymentConfig"]["BlueGreenUpdatePolicy"] for u in calls.params("UpdateEndpoint"))
    assert first["TrafficRoutingConfiguration"] == {
        "Type": "LINEAR", "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25}, "WaitIntervalInSeconds": 60,
    }  # fmt: skip
    assert second["TrafficRoutingConfiguration"] == {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    assert platform.describe("twin").generation == 3


def test_update_that_sagemaker_rolls_back(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    platform.create(sm_config())
    emulate_update_endpoint(calls, roll_back="Alarm twin-primary-5xx-errors fired during baking")
    with pytest.raises(UpdateRolledBackError, match="5xx-errors fired"):
        platform.update("twin", sm_config(model="models:/tiny-llm/2"))
    ep = platform.describe("twin")
    assert ep.status is EndpointStatus.IN_SERVICE and ep.generation == 1
    assert ep.failure_reason is not None and "rolled back" in ep.failure_reason
    assert ep.resources["endpoint_config"] == "twin-g1" and ep.target is None
    inventory = aws_inventory(session)  # the new generation is deleted, the old one serves
    assert inventory["models"] == ["twin-g1-primary"] and inventory["endpoint_configs"] == ["twin-g1"]
    emulate_update_endpoint(calls)  # a later update goes through, and clears the reason
    assert platform.update("twin", sm_config(model="models:/tiny-llm/2")).failure_reason is None


def test_update_changing_instance_type_lifts_autoscaling_for_it(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    platform.create(sm_config(replicas=2, autoscaling=TARGET_TRACKING))
    emulate_update_endpoint(calls)
    platform.update(
        "twin", sm_config(replicas=2, autoscaling=TARGET_TRACKING, instance_type="ml.g4dn.2xlarge")
    )
    names = calls.names()
    assert names.index("DeregisterScalableTarget") < names.index("UpdateEndpoint")
    assert names.count("RegisterScalableTarget") == 2  # at create, and again after the update
    assert aws_inventory(session)["scalable_targets"] == ["endpoint/twin/variant/primary"]


def test_scale_within_bounds(platform: SageMakerPlatform, calls: Calls) -> None:
    platform.create(sm_config(replicas=2, autoscaling=TARGET_TRACKING))
    ep = platform.scale("twin", 3)
    assert calls.params("UpdateEndpointWeightsAndCapacities") == [
        {
            "EndpointName": "twin",
            "DesiredWeightsAndCapacities": [{"VariantName": "primary", "DesiredInstanceCount": 3}],
        }
    ]
    assert [(v.desired_replicas, v.current_replicas) for v in ep.variants] == [(3, 3)]
    assert [(e.from_replicas, e.to_replicas) for e in platform.store.events("twin")] == [(2, 3)]
    with pytest.raises(ValidationError, match="outside the autoscaling bounds 2..4"):
        platform.scale("twin", 5)
    assert len(calls.params("UpdateEndpointWeightsAndCapacities")) == 1


def test_set_autoscaling_applies_changes_and_removes(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    platform.create(sm_config(replicas=2))
    assert aws_inventory(session)["scalable_targets"] == []
    step = StepScalingPolicy.model_validate(
        {
            "type": "step_scaling", "threshold": 5, "min_replicas": 1, "max_replicas": 3,
            "step_adjustments": [
                {"metric_interval_upper_bound": -3, "scaling_adjustment": -1},
                {"metric_interval_lower_bound": 0, "scaling_adjustment": 1},
            ],
        }
    )  # fmt: skip
    ep = platform.set_autoscaling("twin", step)
    assert ep.config.autoscaling == step
    inventory = aws_inventory(session)
    assert sorted(inventory["scaling_policies"]) == [
        "twin-primary-step-scale-in",
        "twin-primary-step-scale-out",
    ]
    assert sorted(inventory["alarms"]) == [
        "twin-primary-step-scale-in-alarm",
        "twin-primary-step-scale-out-alarm",
    ]
    alarm = next(p for p in calls.params("PutMetricAlarm") if p["AlarmName"].endswith("out-alarm"))
    assert alarm["AlarmActions"][0].startswith("arn:aws:autoscaling:")  # the policy's real ARN
    # step → target tracking: the step policies and their alarms go, the new policy stays
    ep = platform.set_autoscaling("twin", TargetTrackingPolicy.model_validate(TARGET_TRACKING))
    inventory = aws_inventory(session)
    assert inventory["scaling_policies"] == ["twin-primary-target-tracking"] and inventory["alarms"] == []
    assert inventory["scalable_targets"] == ["endpoint/twin/variant/primary"]
    ep = platform.set_autoscaling("twin", None)
    assert ep.config.autoscaling is None
    inventory = aws_inventory(session)
    assert inventory["scalable_targets"] == [] and inventory["scaling_policies"] == []


def test_delete_leaves_nothing_and_is_idempotent(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    platform.create(sm_config(replicas=2, autoscaling=TARGET_TRACKING))
    emulate_update_endpoint(calls)
    platform.update("twin", sm_config(replicas=2, autoscaling=TARGET_TRACKING), canary_percent=[50])
    step = {
        "type": "step_scaling", "threshold": 5, "min_replicas": 1, "max_replicas": 3,
        "step_adjustments": [{"metric_interval_lower_bound": 0, "scaling_adjustment": 1}],
    }  # fmt: skip
    platform.set_autoscaling("twin", StepScalingPolicy.model_validate(step))
    assert aws_inventory(session)["alarms"]  # rollback and step-scaling alarms
    assert platform.delete("twin") is True
    assert aws_inventory(session) == NOTHING
    assert platform.store.list_endpoints() == []
    assert platform.delete("twin") is False


def test_logs_are_the_cloudwatch_streams(platform: SageMakerPlatform, session: boto3.Session) -> None:
    platform.create(sm_config())
    assert platform.logs("twin") == {}  # no log group yet
    logs = session.client("logs")
    group = "/aws/sagemaker/Endpoints/twin"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="primary/i-0abc")
    now_ms = int(time.time() * 1000)
    events = [{"timestamp": now_ms - 10 + i, "message": f"line {i}"} for i in range(10)]
    logs.put_log_events(logGroupName=group, logStreamName="primary/i-0abc", logEvents=events)
    assert platform.logs("twin", lines=3) == {"primary/i-0abc": "line 7\nline 8\nline 9"}


def _variants(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "model": "models:/tiny-llm@champion", "replicas": 2, "weight": 1} for n in names]


def test_two_variants_and_renamed_variants(platform: SageMakerPlatform, calls: Calls) -> None:
    platform.create(sm_config(variants=_variants("blue", "green")))
    (config,) = calls.params("CreateEndpointConfig")
    assert [v["VariantName"] for v in config["ProductionVariants"]] == ["blue", "green"]
    assert [m["ModelName"] for m in calls.params("CreateModel")] == ["twin-g1-blue", "twin-g1-green"]
    emulate_update_endpoint(calls)
    with pytest.raises(ValidationError, match="same variant names"):
        platform.update("twin", sm_config(variants=_variants("red")), canary_percent=[10])
    ep = platform.update("twin", sm_config(variants=_variants("red")))
    (update,) = calls.params("UpdateEndpoint")
    assert "DeploymentConfig" not in update  # SageMaker's plain blue/green: no guardrails across renames
    assert [v.name for v in ep.variants] == ["red"]


def test_found_by_name_and_by_endpoint(platform: SageMakerPlatform) -> None:
    from twinserve.platforms import get_platform, platform_of

    assert isinstance(get_platform("sagemaker", platform.store), SageMakerPlatform)
    platform.create(sm_config())
    assert isinstance(platform_of("twin", platform.store), SageMakerPlatform)
