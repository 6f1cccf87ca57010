"""An async endpoint of the real default model: 10 jobs through the router, read back with the
client, the CLI and SageMaker's own client (boto3 `invoke_endpoint_async` through the gateway).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.servers import until
from twinserve.cli import jobs
from twinserve.cli.main import app
from twinserve.client import LLMClient
from twinserve.deploy.spec import EndpointConfig
from twinserve.platforms.local.platform import LocalPlatform

pytestmark = pytest.mark.integration


def test_ten_jobs_on_the_default_model(
    manager: LocalPlatform, default_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EndpointConfig.model_validate(
        {
            "name": "twin-async",
            "variants": [{"model": str(default_model_path), "threads": 2}],
            "async": {"max_concurrent_invocations_per_replica": 8},
        }
    )
    platform = manager
    ep = platform.create(config, controller=False)
    assert ep.url is not None
    questions = [f"In one sentence, what is {topic}?" for topic in ("SQL", "Rust", "a GPU", "DNS", "TLS")]
    with LLMClient(ep.url, api="openai") as client:
        invocations = [
            client.submit_async(messages=[{"role": "user", "content": q}], max_new_tokens=24, temperature=0)
            for q in questions * 2
        ]
        answers = [inv.result(timeout=600) for inv in invocations]
    assert len({inv.inference_id for inv in invocations}) == 10
    assert all(a.text.strip() for a in answers)
    for inv in invocations:  # the stored answer is the body /invocations returned for a chat body
        assert inv.output_location is not None
        path = Path(inv.output_location.removeprefix("file://"))
        assert json.loads(path.read_bytes())["object"] == "chat.completion"

    runner = CliRunner()
    monkeypatch.setattr(jobs.out, "width", 250)
    listed = runner.invoke(app, ["jobs", "list", "twin-async"])
    assert listed.exit_code == 0, listed.output
    assert "succeeded 10" in listed.output
    result = runner.invoke(app, ["jobs", "result", invocations[0].inference_id])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["choices"][0]["message"]["content"] == answers[0].text

    # the CLI's own submit, waiting for the answer
    submitted = runner.invoke(
        app, ["endpoint", "invoke-async", "twin-async", questions[0], "--max-new-tokens", "24", "--wait"]
    )
    assert submitted.exit_code == 0, submitted.output
    assert submitted.stdout.strip() and "queued " in submitted.stderr  # the answer, after the id

    # SageMaker's client through the local SageMaker Runtime gateway
    import boto3

    gateway = platform.runtime_api_url()
    assert gateway is not None
    runtime = boto3.client(
        "sagemaker-runtime",
        endpoint_url=gateway,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    body = json.dumps({"inputs": questions[1], "parameters": {"max_new_tokens": 8}})
    reply = runtime.invoke_endpoint_async(
        EndpointName="twin-async", Body=body.encode(), ContentType="application/json"
    )
    status_url = f"{ep.url}/async-invocations/{reply['InferenceId']}"
    assert until(lambda: httpx.get(status_url, timeout=10).json()["status"] == "succeeded", 300)
    assert reply["OutputLocation"].endswith(f"{reply['InferenceId']}.out")
