"""Async endpoints with real processes on the tiny model: replicas, router, job service, controller.

Jobs go in through the endpoint's router URL (`POST /async-invocations`), wait in the SQLite
queue, run on the replicas through the workers, and land in the results folder; the endpoint
keeps taking jobs at zero replicas and the controller wakes it from zero and puts it back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_server import redis_server
from tests.servers import until
from twinserve.deploy.spec import EndpointConfig, EndpointStatus
from twinserve.errors import NotFoundError
from twinserve.jobs.model import JobStatus
from twinserve.jobs.queue import open_queue
from twinserve.platforms.local.platform import LocalPlatform

BODY = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}


def _config(model: Path, name: str, **extra: Any) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": name,
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [{"model": str(model), "dtype": "float32", "device": "cpu", "threads": 1}],
            "async": {"max_concurrent_invocations_per_replica": 4},
            **extra,
        }
    )


def _submit(url: str, body: dict[str, Any] = BODY) -> dict[str, Any]:
    response = httpx.post(f"{url}/async-invocations", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return dict(response.json())


def _status(url: str, inference_id: str) -> str:
    return str(httpx.get(f"{url}/async-invocations/{inference_id}", timeout=10).json()["status"])


def _all_final(url: str, ids: list[str]) -> bool:
    return all(_status(url, i) in ("succeeded", "failed", "expired") for i in ids)


def test_jobs_run_on_the_replicas_and_wait_out_a_scale_to_zero(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    ep = manager.create(_config(tiny_model_dir, "twin"), controller=False)
    assert ep.status is EndpointStatus.IN_SERVICE and ep.async_url and ep.url
    assert manager.job_service.alive(ep)
    url = ep.url

    ids = [_submit(url)["inference_id"] for _ in range(5)]
    assert until(lambda: _all_final(url, ids), 120)
    for inference_id in ids:
        assert _status(url, inference_id) == "succeeded"
        answer = httpx.get(f"{url}/async-invocations/{inference_id}/output", timeout=10)
        assert answer.status_code == 200
        assert answer.json()[0]["generated_text"]  # the body /invocations returns for a TGI body

    # zero replicas: the router still takes jobs, and they wait in the queue
    manager.scale("twin", 0)
    assert manager.describe("twin").variants[0].current_replicas == 0
    waiting = [_submit(url)["inference_id"] for _ in range(3)]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 503  # nothing to run them on
    assert httpx.get(f"{url}/async/stats", timeout=10).json()["backlog"] == 3
    assert [_status(url, i) for i in waiting] == ["queued"] * 3
    assert manager.reconcile("twin") == []  # zero replicas is what it wants: nothing to fix

    manager.scale("twin", 1)
    assert until(lambda: _all_final(url, waiting), 120)
    assert [_status(url, i) for i in waiting] == ["succeeded"] * 3

    # delete purges the queue (the results stay where they are)
    queue = open_queue(None, state_dir=manager.store.path.parent)
    assert queue.get(waiting[0]).status.value == "succeeded"
    assert manager.delete("twin")
    with pytest.raises(NotFoundError):
        queue.get(waiting[0])


def test_the_controller_wakes_the_endpoint_from_zero_and_puts_it_back(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    policy = {
        "type": "target_tracking",
        "metric": "backlog_per_replica",
        "target": 4,
        "min_replicas": 0,
        "max_replicas": 1,
        "lookback_s": 2,
        "scale_in_cooldown_s": 2,
        "scale_out_cooldown_s": 0,
    }
    ep = manager.create(_config(tiny_model_dir, "sleepy", autoscaling=policy))
    url = ep.url
    assert url is not None

    def at_zero() -> bool:
        """Scaled in and done with it: no replica left that could still take the job."""
        ep = manager.describe("sleepy")
        v = ep.variants[0]
        return ep.operation is None and v.desired_replicas == 0 and v.current_replicas == 0

    assert until(at_zero, 120)  # idle: scaled in to zero
    job = _submit(url)["inference_id"]
    assert until(lambda: _status(url, job) == "succeeded", 240)
    reasons = [e.reason for e in manager.events("sleepy", limit=None)]
    assert any("HasBacklogWithoutCapacity" in r for r in reasons), reasons
    assert until(at_zero, 120)  # idle again: back to zero
    wakes = [e for e in manager.events("sleepy", limit=None) if (e.from_replicas, e.to_replicas) == (0, 1)]
    ins = [e for e in manager.events("sleepy", limit=None) if (e.from_replicas, e.to_replicas) == (1, 0)]
    assert len(wakes) == 1 and len(ins) == 2


def test_a_dead_job_service_is_restarted_and_loses_no_accepted_job(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    import os
    import signal

    ep = manager.create(_config(tiny_model_dir, "phoenix"), controller=False)
    url = ep.url
    assert url is not None and ep.async_pid is not None
    manager.scale("phoenix", 0)
    ids = [_submit(url)["inference_id"] for _ in range(3)]
    os.kill(ep.async_pid, signal.SIGKILL)
    assert until(lambda: not manager.job_service.alive(manager.store.get_endpoint("phoenix")), 10)
    actions = manager.reconcile("phoenix")
    assert "the job service was down; restarting it" in actions
    restarted = manager.store.get_endpoint("phoenix")
    assert restarted.async_url == ep.async_url and restarted.async_pid != ep.async_pid  # same upstream
    manager.scale("phoenix", 1)
    assert until(lambda: _all_final(url, ids), 120)
    assert [_status(url, i) for i in ids] == ["succeeded"] * 3


def test_an_async_endpoint_on_a_redis_queue(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    with redis_server() as redis_url:  # skips where redis-server is missing, fails under CI=true
        config = _config(tiny_model_dir, "twin-redis")
        assert config.async_inference is not None
        config.async_inference.queue_url = redis_url
        ep = manager.create(config, controller=False)
        assert ep.url is not None
        url = ep.url
        ids = [_submit(url)["inference_id"] for _ in range(3)]
        assert until(lambda: _all_final(url, ids), 120)
        assert [_status(url, i) for i in ids] == ["succeeded"] * 3
        queue = open_queue(redis_url, state_dir=manager.store.path.parent)  # the jobs are in Redis
        assert queue.counts("twin-redis")[JobStatus.SUCCEEDED] == 3
        sqlite = open_queue(None, state_dir=manager.store.path.parent)
        with pytest.raises(NotFoundError):
            sqlite.get(ids[0])
        manager.delete("twin-redis")
        assert sum(queue.counts("twin-redis").values()) == 0  # purged with the endpoint


def test_an_update_keeps_the_queue_and_restarts_the_job_service_with_the_new_settings(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    from twinserve.errors import ValidationError

    ep = manager.create(_config(tiny_model_dir, "morph"), controller=False)
    url = ep.url
    assert url is not None
    manager.scale("morph", 0)
    ids = [_submit(url)["inference_id"] for _ in range(2)]
    data = manager.store.get_endpoint("morph").config.to_dict(reveal_secrets=True)
    with pytest.raises(ValidationError, match="cannot make the endpoint real-time"):
        manager.update("morph", EndpointConfig.from_dict({k: v for k, v in data.items() if k != "async"}))
    with pytest.raises(ValidationError, match="cannot move the endpoint's queue"):
        manager.update(
            "morph", EndpointConfig.from_dict({**data, "async": {"queue_url": "redis://127.0.0.1:1/0"}})
        )
    updated = manager.update(
        "morph", EndpointConfig.from_dict({**data, "async": {"max_concurrent_invocations_per_replica": 1}})
    )
    # no autoscaling: green starts the config's count (1); the jobs queued at zero run on it
    assert updated.generation == 2 and updated.variants[0].desired_replicas == 1
    assert updated.async_url == ep.async_url and updated.async_pid != ep.async_pid
    assert until(lambda: _all_final(url, ids), 120)
    assert [_status(url, i) for i in ids] == ["succeeded"] * 2
    assert httpx.get(f"{url}/async/stats", timeout=10).json()["capacity"] == 1  # K = 1 now


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto in server mode on 127.0.0.1: the job service (another process) reaches it through
    boto3's AWS_ENDPOINT_URL, as it would reach S3."""
    import boto3
    from moto.server import ThreadedMotoServer

    from twinserve.server.process import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        yield boto3.client("s3")
    finally:
        server.stop()


def test_answers_and_inputs_on_s3(manager: LocalPlatform, tiny_model_dir: Path, s3_server: Any) -> None:
    s3_server.create_bucket(Bucket="twin-results")
    s3_server.put_object(Bucket="twin-results", Key="in/job.json", Body=json.dumps(BODY).encode())
    config = _config(tiny_model_dir, "twin-s3")
    assert config.async_inference is not None
    config.async_inference.output_location = "s3://twin-results/out"
    ep = manager.create(config, controller=False)
    assert ep.url is not None
    url = ep.url
    inline = _submit(url)
    by_location = httpx.post(
        f"{url}/async-invocations", headers={"X-Input-Location": "s3://twin-results/in/job.json"}, timeout=30
    )
    assert by_location.status_code == 202, by_location.text
    ids = [inline["inference_id"], by_location.json()["inference_id"]]
    assert inline["output_location"] == f"s3://twin-results/out/{ids[0]}.out"
    assert until(lambda: _all_final(url, ids), 120)
    assert [_status(url, i) for i in ids] == ["succeeded"] * 2
    for inference_id in ids:  # the answer is the object on S3, and /output reads it back
        stored = s3_server.get_object(Bucket="twin-results", Key=f"out/{inference_id}.out")["Body"].read()
        assert json.loads(stored)[0]["generated_text"]
        assert httpx.get(f"{url}/async-invocations/{inference_id}/output", timeout=10).content == stored
    missing = httpx.post(
        f"{url}/async-invocations", headers={"X-Input-Location": "s3://twin-results/in/nope.json"}, timeout=30
    )
    assert missing.status_code == 202, missing.text  # S3 is read by the worker, not at submit
    gone = missing.json()["inference_id"]
    assert until(lambda: _all_final(url, [gone]), 120)
    job = httpx.get(f"{url}/async-invocations/{gone}", timeout=10).json()
    assert job["status"] == "failed" and job["attempts"] == 1  # a missing input is not retried
    assert "input" in job["failure_reason"]
    error = s3_server.get_object(Bucket="twin-results", Key=f"out/failures/{gone}.error")["Body"].read()
    assert json.loads(error)["error_type"]
