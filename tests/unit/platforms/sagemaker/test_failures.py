"""When SageMaker or AWS says no: Failed endpoints, errors mid-way, half-created endpoints, secrets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.servers import dead_holder
from tests.unit.platforms.sagemaker.conftest import (
    HF_SECRET_TOKEN,
    HUB_SHA,
    NOTHING,
    SMALL_HUB_CONFIG,
    Calls,
    aws_inventory,
    client_error,
    emulate_update_endpoint,
    hub_model,
    sm_config,
)
from twinserve.deploy.spec import EndpointStatus
from twinserve.errors import ModelLoadError, ServerError, TwinserveError, ValidationError
from twinserve.platforms.sagemaker.platform import SageMakerPlatform

REASON = "The primary container for production variant primary did not pass the ping health check."


def _report_failed(calls: Calls) -> None:
    def failed(parsed: dict[str, Any]) -> None:
        if "EndpointStatus" in parsed:  # not the "no such endpoint" error reply
            parsed.update(EndpointStatus="Failed", FailureReason=REASON)

    calls.patch_reply("DescribeEndpoint", failed)


def _container_log(session: boto3.Session, name: str, *lines: str) -> None:
    logs = session.client("logs")
    group = f"/aws/sagemaker/Endpoints/{name}"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="primary/i-0abc")
    now = int(time.time() * 1000)
    events = [{"timestamp": now + i, "message": line} for i, line in enumerate(lines)]
    logs.put_log_events(logGroupName=group, logStreamName="primary/i-0abc", logEvents=events)


def test_failed_endpoint_reports_reason_and_log_tail_and_cleans_up(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    _container_log(session, "twin", "Downloading model", "torch.OutOfMemoryError: CUDA out of memory")
    _report_failed(calls)
    with pytest.raises(ModelLoadError) as info:
        platform.create(sm_config(autoscaling={"type": "target_tracking", "target": 4, "max_replicas": 2}))
    assert REASON in info.value.message and "CUDA out of memory" in info.value.message
    ep = platform.store.get_endpoint("twin")
    assert ep.status is EndpointStatus.FAILED and ep.operation is None
    assert ep.failure_reason is not None and "CUDA out of memory" in ep.failure_reason
    assert aws_inventory(session) == NOTHING
    assert "RegisterScalableTarget" not in calls.names()  # never applied to a Failed endpoint
    assert platform.delete("twin") is True and platform.store.list_endpoints() == []


def test_keep_on_failure_keeps_resources_until_delete(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    _report_failed(calls)
    with pytest.raises(ModelLoadError, match="ping health check"):
        platform.create(sm_config(), keep_on_failure=True)
    kept = aws_inventory(session)
    assert (kept["models"], kept["endpoint_configs"], kept["endpoints"]) == (
        ["twin-g1-primary"],
        ["twin-g1"],
        ["twin"],
    )
    ep = platform.describe("twin")
    assert ep.status is EndpointStatus.FAILED and "keep_on_failure" in (ep.failure_reason or "")
    assert platform.delete("twin") is True
    assert aws_inventory(session) == NOTHING


def test_aws_error_mid_create_names_the_step_and_leaves_nothing(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    calls.answer(
        "CreateEndpointConfig",
        lambda _: client_error(
            "ResourceLimitExceeded", "The account-level service limit is 0 Instances", "x"
        ),
    )
    with pytest.raises(ValidationError, match=r"^create_endpoint_config twin-g1 failed: .*service limit"):
        platform.create(sm_config())
    assert aws_inventory(session) == NOTHING
    ep = platform.store.get_endpoint("twin")
    assert ep.status is EndpointStatus.FAILED and "create_endpoint_config" in (ep.failure_reason or "")


def test_autoscaling_error_after_inservice_cleans_up(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    calls.answer("PutScalingPolicy", lambda _: client_error("ThrottlingException", "Rate exceeded", "x"))
    with pytest.raises(ServerError, match="put_scaling_policy failed"):
        platform.create(sm_config(autoscaling={"type": "target_tracking", "target": 4, "max_replicas": 2}))
    assert aws_inventory(session) == NOTHING


def test_half_created_endpoint_deletes_cleanly(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    # the config is refused and the clean-up of the model is throttled: the model is left over
    calls.answer("CreateEndpointConfig", lambda _: client_error("ValidationException", "bad variant", "x"))
    calls.answer("DeleteModel", lambda _: client_error("ThrottlingException", "Rate exceeded", "x"))
    with pytest.raises(ValidationError, match="create_endpoint_config"):
        platform.create(sm_config())
    ep = platform.store.get_endpoint("twin")
    assert ep.status is EndpointStatus.FAILED and "clean-up incomplete" in (ep.failure_reason or "")
    assert aws_inventory(session)["models"] == ["twin-g1-primary"]
    assert aws_inventory(session)["endpoint_configs"] == []
    calls.answer("DeleteModel", None)  # AWS answers again
    assert platform.delete("twin") is True  # the config that never existed is skipped
    assert aws_inventory(session) == NOTHING and platform.store.list_endpoints() == []
    assert platform.delete("twin") is False


def test_delete_that_fails_keeps_the_record_for_a_retry(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session
) -> None:
    platform.create(sm_config())
    calls.answer("DeleteEndpointConfig", lambda _: client_error("ThrottlingException", "Rate exceeded", "x"))
    with pytest.raises(TwinserveError, match="delete of 'twin' is incomplete"):
        platform.delete("twin")
    assert platform.store.get_endpoint("twin").status is EndpointStatus.FAILED
    calls.answer("DeleteEndpointConfig", None)
    assert platform.delete("twin") is True and aws_inventory(session) == NOTHING


@pytest.fixture
def hub_secret(session: boto3.Session) -> str:
    return str(
        session.client("secretsmanager").create_secret(Name="hf-token", SecretString=HF_SECRET_TOKEN)["ARN"]
    )


def _no_token_in(*texts: str) -> None:
    for text in texts:
        assert HF_SECRET_TOKEN not in text


def test_hub_model_with_token_secret_never_leaks(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session, hub_secret: str, tmp_path: Path
) -> None:
    model = hub_model(tmp_path, "acme/small-llm", config=SMALL_HUB_CONFIG)
    said: list[str] = []
    ep = platform.create(sm_config(model=model, hf_token_secret=hub_secret), progress=said.append)

    (create,) = calls.params("CreateModel")
    env = create["PrimaryContainer"]["Environment"]
    assert env["HF_TOKEN"] == env["HUGGING_FACE_HUB_TOKEN"] == HF_SECRET_TOKEN  # only in the container
    assert (env["HF_MODEL_ID"], env["HF_MODEL_REVISION"]) == ("acme/small-llm", HUB_SHA)
    assert "ModelDataSource" not in create["PrimaryContainer"]
    assert not [n for n in calls.names() if n in ("PutObject", "CreateBucket")]  # the container downloads it
    assert ep.resources["hf_token_secret"] == hub_secret
    assert ep.resources["model_data.primary"] == f"hf://acme/small-llm@{HUB_SHA}"
    _container_log(session, "twin", f"token={HF_SECRET_TOKEN}", "Connected")
    state = b"".join(p.read_bytes() for p in platform.store.path.parent.glob("state.db*"))
    assert HF_SECRET_TOKEN.encode() not in state
    logs = platform.logs("twin")
    assert "Connected" in logs["primary/i-0abc"]
    _no_token_in(
        platform.describe("twin").model_dump_json(),
        str(platform.describe("twin").to_dict()),
        str(logs),
        *said,
    )


def test_json_secret_and_error_text_never_carry_the_token(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session, tmp_path: Path
) -> None:
    arn = session.client("secretsmanager").create_secret(
        Name="hf-json", SecretString=f'{{"HF_TOKEN": "{HF_SECRET_TOKEN}"}}'
    )["ARN"]
    model = hub_model(tmp_path, "acme/small-llm", config=SMALL_HUB_CONFIG)

    def refuse(params: dict[str, Any]) -> Exception:  # an AWS error quoting the value it refused
        value = params["PrimaryContainer"]["Environment"]["HF_TOKEN"]
        return client_error("ValidationException", f"Environment value {value} is invalid", "CreateModel")

    calls.answer("CreateModel", refuse)
    with pytest.raises(ValidationError) as info:
        platform.create(sm_config(model=model, hf_token_secret=arn))
    assert "create_model twin-g1-primary failed" in info.value.message
    assert info.value.__cause__ is None  # the original (with the token) is not chained
    ep = platform.store.get_endpoint("twin")
    _no_token_in(str(info.value), ep.failure_reason or "", ep.model_dump_json())


def test_missing_secret_fails_before_anything_is_created(platform: SageMakerPlatform, calls: Calls) -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf"
    with pytest.raises(TwinserveError, match="get_secret_value"):
        platform.create(sm_config(hf_token_secret=arn))
    assert calls.mutating() == [] and platform.store.list_endpoints() == []


@pytest.mark.parametrize("landed", [True, False])
def test_update_interrupted_in_flight_is_settled_by_the_next_operation(
    platform: SageMakerPlatform, calls: Calls, session: boto3.Session, landed: bool
) -> None:
    platform.create(sm_config())
    emulate_update_endpoint(calls, roll_back=None if landed else "alarm fired")
    interrupted: list[bool] = []

    def ctrl_c(parsed: dict[str, Any]) -> None:  # Ctrl-C while SageMaker works on the update
        if calls.params("UpdateEndpoint") and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt

    calls.patch_reply("DescribeEndpoint", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        platform.update("twin", sm_config(model="models:/tiny-llm/2"))
    ep = platform.store.get_endpoint("twin")
    assert ep.target is not None and ep.operation is None and ep.status is EndpointStatus.UPDATING
    assert "interrupted" in (ep.failure_reason or "")

    ep = platform.scale("twin", 2)  # settles the update from what SageMaker did, then scales
    generation, serving = (2, "twin-g2") if landed else (1, "twin-g1")
    assert (ep.generation, ep.resources["endpoint_config"], ep.target) == (generation, serving, None)
    assert aws_inventory(session)["endpoint_configs"] == [serving]
    assert aws_inventory(session)["models"] == [f"{serving}-primary"]
    assert landed or "did not take: alarm fired" in (ep.failure_reason or "")


def test_create_whose_process_died_is_finished_by_the_next_operation(
    platform: SageMakerPlatform, session: boto3.Session
) -> None:

    policy = {"type": "target_tracking", "target": 4, "max_replicas": 3}
    platform.create(sm_config(autoscaling=policy))
    session.client("application-autoscaling").deregister_scalable_target(
        ServiceNamespace="sagemaker", ResourceId="endpoint/twin/variant/primary",
        ScalableDimension="sagemaker:variant:DesiredInstanceCount",
    )  # fmt: skip
    dead = dead_holder()
    platform.store.update_endpoint(
        "twin", lambda e: e.model_copy(update={"operation": "create", "operation_holder": dead})
    )  # as if killed after create_endpoint, before the autoscaling
    ep = platform.scale("twin", 2)
    assert ep.status is EndpointStatus.IN_SERVICE and ep.operation is None
    assert aws_inventory(session)["scalable_targets"] == ["endpoint/twin/variant/primary"]


def test_transport_is_the_sagemaker_runtime(platform: SageMakerPlatform) -> None:
    from twinserve.client.sagemaker_transport import SageMakerTransport

    ep = platform.create(sm_config())
    transport = platform.transport(ep)
    assert isinstance(transport, SageMakerTransport) and transport.endpoint_name == "twin"
    transport.close()
