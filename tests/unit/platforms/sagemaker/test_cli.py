"""`twinserve endpoint … --platform sagemaker` through typer's CliRunner, on moto: the platform is
recorded at create, so every later command finds it without a flag."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from typer.testing import CliRunner

from tests.unit.platforms.sagemaker.conftest import MODEL, REGION, ROLE
from twinserve.cli import endpoint as endpoint_cli
from twinserve.cli.main import app
from twinserve.deploy.state import StateStore

runner = CliRunner()


@pytest.fixture
def home(aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(endpoint_cli.out, "width", 250)  # rich tables unwrapped, terminal or not
    return tmp_path / "home"


def test_create_describe_list_scale_autoscale_delete(home: Path) -> None:
    created = runner.invoke(
        app,
        ["endpoint", "create", "sm-twin", "--model", MODEL, "--platform", "sagemaker", "--region", REGION]
        + ["--role-arn", ROLE, "--instance-type", "ml.g4dn.xlarge", "--replicas", "1"],
    )
    assert created.exit_code == 0, created.output
    assert "InService" in created.output and f"runtime.sagemaker.{REGION}.amazonaws.com" in created.output
    assert StateStore().get_endpoint("sm-twin").config.platform.type == "sagemaker"

    described = runner.invoke(app, ["endpoint", "describe", "sm-twin"])  # no --platform needed
    assert described.exit_code == 0, described.output
    for text in (
        "platform: sagemaker",
        "InService",
        "models:/tiny-llm@champion → tiny-llm/1",
        "endpoint_config",
    ):
        assert text in described.output, (text, described.output)

    listed = runner.invoke(app, ["endpoint", "list"])
    assert listed.exit_code == 0 and "sm-twin" in listed.output and "sagemaker" in listed.output

    scaled = runner.invoke(app, ["endpoint", "scale", "sm-twin", "--replicas", "2"])
    assert scaled.exit_code == 0, scaled.output
    variants = boto3.client("sagemaker", region_name=REGION).describe_endpoint(EndpointName="sm-twin")
    assert variants["ProductionVariants"][0]["DesiredInstanceCount"] == 2

    autoscaled = runner.invoke(app, ["endpoint", "autoscale", "sm-twin", "--autoscale", "1..3"])
    assert autoscaled.exit_code == 0 and "1..3 replicas" in autoscaled.output, autoscaled.output
    targets = boto3.client("application-autoscaling", region_name=REGION).describe_scalable_targets(
        ServiceNamespace="sagemaker"
    )["ScalableTargets"]
    assert [(t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [(1, 3)]

    local_only = runner.invoke(app, ["endpoint", "reconcile", "sm-twin"])
    assert local_only.exit_code == 2 and "runs on sagemaker" in local_only.output

    deleted = runner.invoke(app, ["endpoint", "delete", "sm-twin"])
    assert deleted.exit_code == 0 and "deleted" in deleted.output, deleted.output
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert runner.invoke(app, ["endpoint", "delete", "sm-twin"]).exit_code == 0  # idempotent


def test_bad_input_is_refused_before_aws(home: Path) -> None:
    no_role = runner.invoke(
        app,
        ["endpoint", "create", "sm-x", "--model", MODEL, "--platform", "sagemaker", "--region", REGION]
        + ["--instance-type", "ml.g4dn.xlarge"],
    )
    assert no_role.exit_code != 0 and "role" in no_role.output.lower(), no_role.output
    bad_type = runner.invoke(
        app,
        ["endpoint", "create", "sm-x", "--model", MODEL, "--platform", "sagemaker", "--region", REGION]
        + ["--role-arn", ROLE, "--instance-type", "g5.big"],
    )
    assert bad_type.exit_code == 2 and "instance_type" in bad_type.output, bad_type.output
    sm = boto3.client("sagemaker", region_name=REGION)
    assert sm.list_models()["Models"] == [] and sm.list_endpoints()["Endpoints"] == []
