"""Health through the service's life (loading, ready, failed, draining, dead), /info and /metrics."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from tests.servers import serve_config
from tests.unit.server.conftest import asgi_client
from twinserve.engine.async_engine import ENGINE_DEAD
from twinserve.server.app import create_app
from twinserve.server.service import ModelService

pytestmark = pytest.mark.anyio


async def test_health_is_503_while_loading_then_200(tiny_model_dir: Path) -> None:
    config = serve_config(tiny_model_dir)
    service = ModelService(config)
    app = create_app(config, service)
    try:
        async with asgi_client(app) as http:
            r = await http.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = await http.post("/generate", json={"inputs": "hi"})
            assert r.status_code == 503 and r.json()["error_type"] == "not_ready"
            assert r.headers["retry-after"] == "1"
            service.start_loading()
            assert await asyncio.to_thread(service.wait_loaded, 120)
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/ping")).status_code == 200
            r = await http.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            assert r.status_code == 200
    finally:
        service.shutdown()


async def test_a_model_that_cannot_load_reports_why(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    config = serve_config(tmp_path)
    service = ModelService(config)
    service.start_loading()
    assert not await asyncio.to_thread(service.wait_loaded, 60)
    async with asgi_client(create_app(config, service)) as http:
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        # a stable sentence: the reason (pickle weights, a local path) is in the log only
        assert r.json()["reason"] == "the model failed to load (the server log says why)"
        r = await http.post("/generate", json={"inputs": "hi"})
        assert r.status_code == 503


@pytest.mark.parametrize("env", ["SM_NUM_GPUS", "NUM_SHARD"])
async def test_more_than_one_gpu_is_refused_with_a_clear_reason(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, env: str
) -> None:
    """Tensor parallelism is not implemented: a SageMaker config asking for 2 GPUs must fail to
    load (and `serve` exit 1) saying why, not silently serve from one device."""
    monkeypatch.setenv(env, "2")
    config = serve_config(tiny_model_dir)
    assert config.num_shard == 2
    service = ModelService(config)
    fatal: list[bool] = []
    service.on_fatal = lambda: fatal.append(True)  # what makes `twinserve serve` exit 1
    with caplog.at_level(logging.ERROR, logger="twinserve"):
        service.start_loading()
        assert not await asyncio.to_thread(service.wait_loaded, 60)
    assert service.engine is None and fatal == [True]  # refused before loading anything
    reasons = [
        str(getattr(r, "reason", "")) for r in caplog.records if r.getMessage() == "model failed to load"
    ]
    assert reasons and "tensor parallelism is not supported" in reasons[0] and "num_shard=2" in reasons[0]
    async with asgi_client(create_app(config, service)) as http:
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed"


async def test_draining_stops_admission(client: httpx.AsyncClient, app_and_service) -> None:
    _, service = app_and_service
    service.begin_drain()
    assert (await client.get("/health")).json()["status"] == "draining"
    r = await client.post("/generate", json={"inputs": "hi"})
    assert r.status_code == 503 and "shutting down" in r.json()["error"]


async def test_a_dead_engine_turns_health_to_503(
    client: httpx.AsyncClient, app_and_service, monkeypatch
) -> None:
    _, service = app_and_service

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    # fault injection: every forward pass fails, so the engine gives up after 3 in a row
    monkeypatch.setattr(service.engine.engine.runner, "execute", broken)
    statuses = []
    for _ in range(3):
        r = await client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        statuses.append((r.status_code, r.json()["error_type"]))
    assert statuses[0] == (424, "generation")
    for _ in range(100):
        if not service.engine.is_healthy:
            break
        await asyncio.sleep(0.02)
    r = await client.get("/health")
    assert r.status_code == 503 and r.json()["reason"] == ENGINE_DEAD and "device lost" not in r.text
    r = await client.post("/generate", json={"inputs": "hi"})
    assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"


async def test_info_reports_model_limits_and_weights(client: httpx.AsyncClient, app_and_service) -> None:
    _, service = app_and_service
    info = (await client.get("/info")).json()
    assert info["model_id"] == service.model_id
    assert info["max_input_tokens"] == 128 and info["max_total_tokens"] == 256
    assert (
        info["max_concurrent_requests"] == 32 and info["max_stop_sequences"] == 4 and info["max_best_of"] == 1
    )
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu"
    assert len(info["weights_sha256"]) == 64 and info["version"]


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_metrics_count_requests_by_outcome(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        await client.post(
            "/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
        )
    await client.post("/generate", json={"inputs": "hi", "parameters": {"top_p": 7}})
    text = (await client.get("/metrics")).text
    assert _sample(text, "tgi_request_count") == 3
    assert _sample(text, "tgi_request_success") == 2
    assert _sample(text, 'tgi_request_failure{err="validation"}') == 1
    assert _sample(text, "tgi_request_generated_tokens_sum") == 8
    assert _sample(text, "twinserve_time_to_first_token_seconds_count") == 2
    assert _sample(text, "twinserve_inter_token_latency_seconds_count") == 6
    for name in (
        "tgi_request_duration_count",
        "tgi_request_validation_duration_count",
        "tgi_request_queue_duration_count",
        "tgi_request_inference_duration_count",
        "tgi_request_mean_time_per_token_duration_count",
        "tgi_request_input_length_count",
    ):
        assert _sample(text, name) == 2
    assert _sample(text, "tgi_request_validation_duration_sum") > 0  # measured, not a constant 0
    assert _sample(text, "tgi_queue_size") == 0 and _sample(text, "tgi_batch_current_size") == 0
