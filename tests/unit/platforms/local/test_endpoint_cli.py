"""`twinserve endpoint …` through typer's CliRunner, with real processes on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from twinserve.cli.main import app
from twinserve.platforms.local.platform import LocalPlatform

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path))
    try:
        yield tmp_path
    finally:  # no process outlives the test, whatever failed
        manager = LocalPlatform()
        for endpoint in manager.store.list_endpoints():
            manager.delete(endpoint.name)


def test_create_list_describe_invoke_logs_delete(home: Path, tiny_model_dir: Path) -> None:
    created = runner.invoke(
        app,
        ["endpoint", "create", "cli-twin", "--model", str(tiny_model_dir), "--replicas", "1"]
        + ["--threads", "1", "--dtype", "float32", "--device", "cpu", "--api-key", "cli-key"],
    )
    assert created.exit_code == 0, created.output
    assert "InService" in created.output and "http://127.0.0.1:" in created.output

    listed = runner.invoke(app, ["endpoint", "list"])
    assert listed.exit_code == 0 and "cli-twin" in listed.output and "1/1" in listed.output

    described = runner.invoke(app, ["endpoint", "describe", "cli-twin"])
    assert described.exit_code == 0, described.output
    assert "InService" in described.output and "healthy" in described.output and "sha256:" in described.output
    url = LocalPlatform().describe("cli-twin").url
    assert url and url in described.output
    # the router requires the key given at create; invoke reads it from the state store
    assert httpx.post(f"{url}/generate", json={"inputs": "hi"}, timeout=30).status_code == 401

    for extra in ([], ["--stream"]):
        invoked = runner.invoke(
            app, ["endpoint", "invoke", "cli-twin", "hello", "--max-new-tokens", "4", *extra]
        )
        assert invoked.exit_code == 0, invoked.output

    logs = runner.invoke(app, ["endpoint", "logs", "cli-twin", "--lines", "3"])
    assert logs.exit_code == 0 and "==> router <==" in logs.output

    deleted = runner.invoke(app, ["endpoint", "delete", "cli-twin"])
    assert deleted.exit_code == 0 and "deleted" in deleted.output
    again = runner.invoke(app, ["endpoint", "delete", "cli-twin"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert runner.invoke(app, ["endpoint", "list"]).output.strip() == "no endpoints"


def test_errors_exit_non_zero_with_a_message(home: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["endpoint", "describe", "nope"])
    assert missing.exit_code == 1 and "no endpoint named 'nope'" in missing.output
    assert runner.invoke(app, ["endpoint", "invoke", "nope", "hi"]).exit_code == 1
    assert runner.invoke(app, ["endpoint", "logs", "nope"]).exit_code == 1

    no_model = runner.invoke(app, ["endpoint", "create", "x"])
    assert no_model.exit_code == 2 and "--model" in no_model.output
    bad_name = runner.invoke(app, ["endpoint", "create", "Bad_Name", "--model", "m"])
    assert bad_name.exit_code == 2 and "invalid endpoint config" in bad_name.output

    unknown = runner.invoke(app, ["endpoint", "create", "x", "--model", "m", "--platform", "azure"])
    assert unknown.exit_code == 2 and "local, sagemaker or ray" in unknown.output
    stray = runner.invoke(app, ["endpoint", "create", "x", "--model", "m", "--instance-type", "ml.g5.xlarge"])
    assert stray.exit_code == 2 and "add --platform sagemaker" in stray.output
    assert runner.invoke(app, ["endpoint", "autoscale", "nope", "--off"]).exit_code == 1
    assert runner.invoke(app, ["endpoint", "autoscale", "nope"]).exit_code == 2  # neither flag
    assert runner.invoke(app, ["endpoint", "delete", "nope"]).exit_code == 0  # idempotent

    yaml_file = tmp_path / "ep.yaml"
    yaml_file.write_text("name: other\nvariants: [{model: m}]\n")
    mismatch = runner.invoke(app, ["endpoint", "create", "x", "--config", str(yaml_file)])
    assert mismatch.exit_code == 2 and "not 'x'" in mismatch.output
    both = runner.invoke(app, ["endpoint", "create", "other", "--config", str(yaml_file), "--model", "m"])
    assert both.exit_code == 2 and "not both" in both.output

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    failed = runner.invoke(
        app, ["endpoint", "create", "broken", "--model", str(broken), "--threads", "1", "--device", "cpu"]
    )
    assert failed.exit_code == 1 and "did not become healthy" in failed.output
    described = runner.invoke(app, ["endpoint", "describe", "broken"])
    assert "Failed" in described.output and "failure reason" in described.output


def test_update_scale_reconcile_export_up(home: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    created = runner.invoke(
        app,
        ["endpoint", "create", "ops", "--model", str(tiny_model_dir), "--autoscale", "1..2"]
        + ["--target-concurrency", "8", "--threads", "1", "--dtype", "float32", "--device", "cpu"],
    )
    assert created.exit_code == 0, created.output

    scaled = runner.invoke(app, ["endpoint", "scale", "ops", "--replicas", "2"])
    assert scaled.exit_code == 0 and "primary: 2/2" in scaled.output, scaled.output
    outside = runner.invoke(app, ["endpoint", "scale", "ops", "--replicas", "5"])
    assert outside.exit_code == 2 and "outside the autoscaling bounds" in outside.output

    updated = runner.invoke(app, ["endpoint", "update", "ops", "--model", str(tiny_model_dir), "--bake", "0"])
    assert updated.exit_code == 0 and "generation 2" in updated.output, updated.output
    assert len(LocalPlatform().describe("ops").replicas) == 2  # the scaled count survived the update

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("nope")
    failed = runner.invoke(app, ["endpoint", "update", "ops", "--model", str(broken)])
    assert failed.exit_code == 1 and "rolled back" in failed.output

    described = runner.invoke(app, ["endpoint", "describe", "ops"])
    assert described.exit_code == 0
    for text in (
        "generation 2",
        "router: up",
        "controller: up",
        "scaling events",
        "manual scale",
        "rolled back",
    ):
        assert text in described.output, (text, described.output)

    assert "platform: local" in described.output

    off = runner.invoke(app, ["endpoint", "autoscale", "ops", "--off"])
    assert off.exit_code == 0 and "autoscaling off" in off.output, off.output
    assert LocalPlatform().describe("ops").config.autoscaling is None
    narrow = runner.invoke(app, ["endpoint", "autoscale", "ops", "--autoscale", "1..3"])
    assert narrow.exit_code == 0 and "1..3 replicas" in narrow.output, narrow.output
    policy = LocalPlatform().describe("ops").config.autoscaling
    assert policy is not None and policy.max_replicas == 3

    reconciled = runner.invoke(app, ["endpoint", "reconcile", "ops"])
    assert reconciled.exit_code == 0 and "ops:" in reconciled.output
    every = runner.invoke(app, ["endpoint", "reconcile", "--all"])
    assert every.exit_code == 0 and "ops:" in every.output, every.output
    assert runner.invoke(app, ["endpoint", "reconcile", "ops", "--all"]).exit_code == 2

    exported = runner.invoke(app, ["endpoint", "export-scaling", "ops"])
    assert exported.exit_code == 0, exported.output
    calls = json.loads(exported.output)
    assert [c["operation"] for c in calls] == ["register_scalable_target", "put_scaling_policy"]
    assert calls[0]["params"]["ResourceId"] == "endpoint/ops/variant/primary"

    assert runner.invoke(app, ["endpoint", "delete", "ops"]).exit_code == 0


def test_up_deploys_asks_and_deletes(home: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "twin.md").write_text("# LLM twin\n\nAn LLM twin writes in its owner's voice.\n")
    result = runner.invoke(
        app,
        ["up", "--model", str(tiny_model_dir), "--hold", "0", "--max-new-tokens", "4", "--docs", str(docs)],
    )
    assert result.exit_code == 0, result.output
    for text in (
        "InService",
        "curl http://127.0.0.1:",
        "/v1/chat/completions",
        "/generate",
        "async job",
        "/async-invocations",
        "RAG service is up",
        "sources",
        "docs/twin.md",
        "/rag",
        "deleted",
    ):
        assert text in result.output, (text, result.output)
    assert LocalPlatform().store.list_endpoints() == []
