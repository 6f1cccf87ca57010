"""Bad input fails before any AWS call that creates something; names, images, routing, sizing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.unit.platforms.sagemaker.conftest import ROLE, Calls, emulate_update_endpoint, hub_model, sm_config
from twinserve.deploy.platform_config import SageMakerSettings
from twinserve.errors import NotFoundError, TwinserveError, ValidationError
from twinserve.platforms.sagemaker import images, names
from twinserve.platforms.sagemaker.deployment import traffic_routing
from twinserve.platforms.sagemaker.platform import SageMakerPlatform
from twinserve.platforms.sagemaker.prepare import prepare


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"region": "xx-west-9"}, "unknown or unsupported AWS region 'xx-west-9'"),
        ({"role_arn": None}, "needs an execution role"),
        ({"role_arn": "arn:aws:iam::123456789012:user/me"}, "not an IAM role ARN"),
        ({"instance_type": "ml.foo9.xlarge"}, "not a SageMaker hosting instance type"),
        ({"instance_type": "ml.c7i.xlarge"}, "has no NVIDIA GPU"),
        ({"instance_type": "ml.inf2.xlarge"}, "has no NVIDIA GPU"),
        ({"tgi_version": "9.9"}, "unknown TGI version '9.9'"),
        ({"image": "docker.io/library/tgi:3"}, "not an ECR image URI"),
        ({"mode": "async"}, "mode: async needs the endpoint's `async:` block"),
        ({"hf_token_secret": "arn:aws:s3:::bucket"}, "not a Secrets Manager secret ARN"),
        ({"model_data_bucket": "Not_A_Bucket"}, "not a valid S3 bucket name"),
    ],
)
def test_bad_settings_fail_before_any_aws_change(
    platform: SageMakerPlatform, calls: Calls, overrides: dict[str, Any], error: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(error)):
        platform.create(sm_config(**overrides))
    assert calls.mutating() == [] and platform.store.list_endpoints() == []


@pytest.mark.parametrize(
    ("config", "error", "kind"),
    [
        ({"api_key": "sk-123"}, "authenticate with AWS IAM", ValidationError),
        ({"model": "models:/no-such-model@champion"}, "no-such-model", NotFoundError),
        ({"quantize": "int8"}, "int8 is twinserve's CPU quantization", ValidationError),
        ({"quantize": "int4"}, "int4 is twinserve's CPU quantization", ValidationError),
        ({"limits": {"max_total_tokens": 100_000}}, "exceeds the model's context", ValidationError),
    ],
)
def test_bad_variants_fail_before_any_aws_change(
    platform: SageMakerPlatform, calls: Calls, config: dict[str, Any], error: str, kind: type[Exception]
) -> None:
    base = sm_config().to_dict(reveal_secrets=True)
    variant = {**base["variants"][0], **{k: v for k, v in config.items() if k != "api_key"}}
    data = {**base, "variants": [variant], **({"api_key": config["api_key"]} if "api_key" in config else {})}
    from twinserve.deploy.spec import EndpointConfig

    with pytest.raises(kind, match=re.escape(error)):
        platform.create(EndpointConfig.from_dict(data))
    assert calls.mutating() == []


def test_folder_models_must_be_registered_first(
    platform: SageMakerPlatform, calls: Calls, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="import it first"):
        platform.create(sm_config(model=str(tmp_path)))
    assert calls.mutating() == []


def test_model_too_big_for_the_instance(platform: SageMakerPlatform, calls: Calls, tmp_path: Path) -> None:
    model = hub_model(tmp_path)  # a 70B shape
    with pytest.raises(ValidationError, match=r"does not fit on ml\.g4dn\.xlarge: .*needs .* GiB"):
        platform.create(sm_config(model=model))
    assert calls.mutating() == []


def test_role_from_the_environment(
    platform: SageMakerPlatform, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGEMAKER_ROLE_ARN", ROLE)
    ep = platform.create(sm_config(role_arn=None))
    assert ep.config.platform.sagemaker is not None and ep.config.platform.sagemaker.role_arn == ROLE
    assert calls.params("CreateModel")[0]["ExecutionRoleArn"] == ROLE


def test_no_credentials_names_aws_configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_registry: Any
) -> None:
    from twinserve.deploy.state import StateStore

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("TWINSERVE_REGISTRY_URI", tiny_registry.location.uri)
    monkeypatch.setenv("TWINSERVE_REGISTRY_ARTIFACTS", tiny_registry.location.artifact_location or "")
    platform = SageMakerPlatform(
        StateStore(tmp_path / "state.db"), session=boto3.Session(region_name="us-east-1")
    )
    with pytest.raises(
        ValidationError, match="no AWS credentials found; configure credentials with `aws configure`"
    ):
        platform.create(sm_config())
    assert platform.store.list_endpoints() == []


def test_update_refusals_come_before_any_change(platform: SageMakerPlatform, calls: Calls) -> None:
    platform.create(sm_config(replicas=2))
    emulate_update_endpoint(calls)
    before = len(calls.mutating())
    refusals = [
        (dict(canary_percent=[10, 50]), "is neither"),
        (dict(canary_percent=[60]), "at most 50%"),
        (dict(canary_percent=[12.5]), "whole percents"),
        (dict(bake_s=7200), "0..3600s"),
    ]
    for kwargs, error in refusals:
        with pytest.raises(ValidationError, match=re.escape(error)):
            platform.update("twin", sm_config(model="models:/tiny-llm/2", replicas=2), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="cannot move it to eu-west-1"):
        platform.update("twin", sm_config(region="eu-west-1", replicas=2))
    with pytest.raises(ValidationError, match=">= 2 instances"):
        platform.update("twin", sm_config(model="models:/tiny-llm/2", replicas=1), canary_percent=[10])
    assert len(calls.mutating()) == before
    assert platform.describe("twin").generation == 1


def test_busy_endpoint_refuses_a_second_operation(platform: SageMakerPlatform) -> None:
    platform.create(sm_config())
    platform.store.begin_operation("twin", "update")  # this (live) process holds it
    with pytest.raises(TwinserveError, match="busy"):
        platform.scale("twin", 2)


# --- pure pieces -------------------------------------------------------------------------------


def test_dlc_image_per_region_and_version() -> None:
    tag = "huggingface-pytorch-tgi-inference:2.7.0-tgi3.3.6-gpu-py311-cu124-ubuntu22.04"
    assert images.dlc_image("us-east-1") == f"763104351884.dkr.ecr.us-east-1.amazonaws.com/{tag}"
    assert images.dlc_image("ap-east-1").startswith("871362719292.dkr.ecr.ap-east-1.amazonaws.com/")
    assert images.dlc_image("me-south-1").startswith("217643126080.")
    assert images.dlc_image("cn-north-1").startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    assert images.dlc_image("eu-west-1", "3.0.1").endswith(":2.4.0-tgi3.0.1-gpu-py311-cu124-ubuntu22.04-v2.1")
    assert images.tgi_version("3.2") == "3.2.3"
    assert images.runtime_url("cn-north-1", "twin").startswith(
        "https://runtime.sagemaker.cn-north-1.amazonaws.com.cn/"
    )
    with pytest.raises(ValidationError, match="unknown or unsupported AWS region"):
        images.dlc_image("mars-1")


def test_derived_names_fit_sagemaker() -> None:
    long = "a" * 30 + "-" + "b" * 32  # a 63-character endpoint name
    model = names.model_name(long, 12, "primary-variant-with-a-long-name")
    assert len(model) <= 63 and re.fullmatch(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$", model)
    assert model != names.model_name(long, 13, "primary-variant-with-a-long-name")  # still unique
    assert names.model_name("twin", 1, "primary") == "twin-g1-primary"
    assert names.endpoint_config_name("twin", 3) == "twin-g3"
    with pytest.raises(ValidationError, match="not a valid SageMaker name"):
        names.check_name("under_score", "endpoint name")


@pytest.mark.parametrize(
    ("steps", "instances", "expected"),
    [
        ([], 1, {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 30}),
        ([0, 100], 1, {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 30}),
        (
            [20],
            2,
            {
                "Type": "CANARY",
                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20},
                "WaitIntervalInSeconds": 30,
            },
        ),
        (
            [50, 25, 75],
            4,
            {
                "Type": "LINEAR",
                "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25},
                "WaitIntervalInSeconds": 30,
            },
        ),
    ],
)
def test_traffic_routing(steps: list[float], instances: int, expected: dict[str, Any]) -> None:
    assert traffic_routing(steps, 29.5, instances) == expected


def test_prepare_plans_a_gpu_instance_and_takes_the_variants_limits(aws: None) -> None:
    config = sm_config(instance_type=None, region="us-east-1")
    gen = prepare(config, 1, default_region=None)
    (v,) = gen.variants
    assert v.instance_type == "ml.g4dn.xlarge"  # the cheapest GPU that holds it: the DLC needs CUDA
    assert any("cheapest" in note for note in v.sizing.notes)
    limited = sm_config(
        variants=[
            {
                "model": "models:/tiny-llm@champion",
                "limits": {"max_input_tokens": 100, "max_total_tokens": 200},
            }
        ]
    )
    (v,) = prepare(limited, 1, default_region="us-east-1").variants
    assert (v.env["MAX_INPUT_TOKENS"], v.env["MAX_TOTAL_TOKENS"]) == ("100", "200")


def test_prepare_with_own_image_may_run_on_cpu(aws: None) -> None:
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/twinserve:1.0"
    gen = prepare(sm_config(instance_type=None, image=image), 1, default_region="us-east-1")
    assert gen.image == image
    (v,) = gen.variants
    assert v.instance_type.startswith("ml.c7i.") and "DTYPE" not in v.env and "SM_NUM_GPUS" not in v.env


def test_prepare_needs_a_region(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="no AWS region"):
        prepare(sm_config(), 1, default_region=None)
    assert SageMakerSettings().mode == "realtime"
