"""The job service's HTTP front, in-process (httpx ASGITransport) over a real SQLite queue and a
file result store: submit, validation at the door, polling, answers, API key, stats, metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus
from twinserve.jobs.async_front import create_async_app
from twinserve.jobs.async_settings import AsyncSettings, LiveEndpoint
from twinserve.jobs.model import MAX_INLINE_BODY_BYTES, Job, JobStatus
from twinserve.jobs.queue import JobQueue
from twinserve.jobs.results import ResultStore

pytestmark = pytest.mark.anyio

KEY = "front-key"
TGI = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Front:
    app: FastAPI
    queue: JobQueue
    results: ResultStore
    settings: AsyncSettings
    shared: Path  # an extra input root (config.input_roots)


def _endpoint(shared: Path, **config: Any) -> Endpoint:
    async_config = {"input_roots": [str(shared)], "max_attempts": 2, **config}
    cfg = EndpointConfig.single(
        "twin", "models:/llm-twin/1", api_key=KEY, payload_limit=8 * 1024 * 1024, async_inference=async_config
    )
    return Endpoint.new(cfg).model_copy(update={"status": EndpointStatus.IN_SERVICE})


@pytest.fixture
def front(tmp_path: Path) -> Front:
    shared = tmp_path / "shared"
    shared.mkdir()
    endpoint = _endpoint(shared)
    settings = AsyncSettings.of(endpoint, home=tmp_path / "home", state_path=tmp_path / "state" / "state.db")
    queue, results = settings.open_queue(), settings.open_results()
    app = create_async_app(settings, LiveEndpoint(endpoint), queue, results)
    return Front(app, queue, results, settings, shared)


@pytest.fixture
async def client(front: Front) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=front.app)
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://jobs", headers=headers) as c:
        yield c


async def _submit(client: httpx.AsyncClient, body: Any = TGI, **headers: str) -> httpx.Response:
    return await client.post("/async-invocations", json=body, headers=headers)


def _error(response: httpx.Response, status: int, error_type: str = "validation") -> str:
    assert response.status_code == status, response.text
    data = response.json()
    assert set(data) == {"error", "error_type"} and data["error_type"] == error_type
    return str(data["error"])


# ------------------------------------------------------------------ submit


async def test_submit_answers_202_with_where_the_answer_will_be(
    client: httpx.AsyncClient, front: Front
) -> None:
    r = await _submit(client)
    assert r.status_code == 202
    data = r.json()
    job_id = data["inference_id"]
    assert data == {
        "inference_id": job_id,
        "status": "queued",
        "output_location": front.results.location_for(job_id),
        "failure_location": front.results.location_for(job_id, failed=True),
    }
    assert data["output_location"].startswith(front.settings.output_location + "/")
    assert r.headers["x-output-location"] == data["output_location"]
    assert r.headers["x-failure-location"] == data["failure_location"]
    assert r.headers["location"] == f"/async-invocations/{job_id}"
    # durable before the answer: the queue has it, body and limits from the config
    job = front.queue.get(job_id)
    assert job.status is JobStatus.QUEUED and json.loads(job.body or b"") == TGI
    assert (job.endpoint, job.max_attempts, job.ttl_s) == ("twin", 2, front.settings.config.request_ttl_s)
    assert job.content_type == "application/json" and job.input_location is None


async def test_the_same_inference_id_is_one_job(client: httpx.AsyncClient, front: Front) -> None:
    first = await _submit(client, **{"X-Inference-Id": "req-1"})
    again = await _submit(client, {"inputs": "other"}, **{"X-Inference-Id": "req-1"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and first.json()["inference_id"] == "req-1"
    assert front.queue.counts("twin")[JobStatus.QUEUED] == 1
    assert json.loads(front.queue.get("req-1").body or b"") == TGI  # the first submit's body stays
    # an id another endpoint of the same queue already holds is a conflict, not its job
    front.queue.submit(Job(inference_id="theirs", endpoint="other", body=b"{}"))
    _error(await _submit(client, **{"X-Inference-Id": "theirs"}), 409, "conflict")


async def test_limits_come_from_headers_within_the_config_bounds(
    client: httpx.AsyncClient, front: Front
) -> None:
    r = await _submit(client, **{"X-Request-TTL-Seconds": "60", "X-Invocation-Timeout-Seconds": "5.5"})
    job = front.queue.get(r.json()["inference_id"])
    assert (job.ttl_s, job.invocation_timeout_s) == (60, 5.5)
    for name, value in [
        ("X-Request-TTL-Seconds", "0"),
        ("X-Request-TTL-Seconds", "abc"),
        ("X-Request-TTL-Seconds", str(7 * 3600)),
        ("X-Invocation-Timeout-Seconds", "7200"),
        ("X-Invocation-Timeout-Seconds", "nan"),
    ]:
        assert name in _error(await _submit(client, **{name: value}), 422)


async def test_an_inline_body_over_6_mb_is_413(client: httpx.AsyncClient, front: Front) -> None:
    big = b'{"inputs": "' + b"a" * MAX_INLINE_BODY_BYTES + b'"}'
    r = await client.post("/async-invocations", content=big, headers={"content-type": "application/json"})
    assert "X-Input-Location" in _error(r, 413, "payload_too_large")
    # a body over the replicas' own payload limit would only fail after its wait: refused now
    small = _endpoint(front.shared).config.model_copy(update={"payload_limit": 100})
    endpoint = Endpoint.new(small)
    app = create_async_app(front.settings, LiveEndpoint(endpoint), front.queue, front.results)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobs", headers=client.headers) as c:
        _error(await _submit(c, {"inputs": "a" * 100}), 413, "payload_too_large")
        assert (await _submit(c)).status_code == 202


async def test_the_input_is_inline_or_by_location_never_both(client: httpx.AsyncClient, front: Front) -> None:
    path = front.shared / "in.json"
    path.write_text(json.dumps(TGI))
    _error(await client.post("/async-invocations"), 422)  # neither
    both = await _submit(client, **{"X-Input-Location": path.as_uri()})
    assert "not both" in _error(both, 422)


async def test_inference_ids_are_checked(client: httpx.AsyncClient) -> None:
    for bad in ["../etc", ".hidden", "a/b", "x" * 201]:
        _error(await _submit(client, **{"X-Inference-Id": bad}), 422)


async def test_input_locations_are_checked_at_submit(
    client: httpx.AsyncClient, front: Front, tmp_path: Path
) -> None:
    inside = front.shared / "in.json"
    inside.write_text(json.dumps(TGI))
    inputs = Path(front.settings.input_roots[0])  # HOME/endpoints/twin/inputs
    inputs.mkdir(parents=True)
    (inputs / "own.json").write_text(json.dumps(TGI))
    outside = tmp_path / "secret.json"
    outside.write_text("{}")

    async def by_location(location: str) -> httpx.Response:
        return await client.post("/async-invocations", headers={"X-Input-Location": location})

    for location in [inside.as_uri(), (inputs / "own.json").as_uri(), "s3://my-bucket/in/1.json"]:
        r = await by_location(location)
        assert r.status_code == 202, r.text
        assert front.queue.get(r.json()["inference_id"]).input_location == location
    assert "outside" in _error(await by_location(outside.as_uri()), 422)
    assert "outside" in _error(await by_location((tmp_path / "nothing.json").as_uri()), 422)
    _error(await by_location((front.shared / "missing.json").as_uri()), 422)  # in a root, but absent
    _error(await by_location(front.shared.as_uri()), 422)  # a folder
    _error(await by_location(f"file://{front.shared}/../secret.json"), 422)
    for bad in [
        "http://example.com/x",
        "s3://Bad_Bucket/x",
        "s3://my-bucket",
        "s3://my-bucket/dir/",
        "/abs/path",
    ]:
        _error(await by_location(bad), 422)


async def test_bodies_a_replica_would_refuse_fail_at_submit(client: httpx.AsyncClient) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert (await _submit(client, chat)).status_code == 202
    assert (await _submit(client, {"prompt": "once", "max_tokens": 4})).status_code == 202
    assert "stream" in _error(await _submit(client, {**TGI, "stream": True}), 422)
    assert "stream" in _error(await _submit(client, {**chat, "stream": True}), 422)
    assert "top_p" in _error(await _submit(client, {"inputs": "x", "parameters": {"top_p": 7}}), 422)
    assert "`inputs`" in _error(await _submit(client, {"text": "hi"}), 422)
    assert "JSON object" in _error(await _submit(client, ["hi"]), 422)
    raw = await client.post(
        "/async-invocations", content=b'{"inputs": ', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in _error(raw, 422)
    text = await client.post("/async-invocations", content=b"hello", headers={"content-type": "text/plain"})
    assert "application/json" in _error(text, 422)


# ------------------------------------------------------------------ polling and answers


async def test_a_job_goes_from_queued_to_an_answer(client: httpx.AsyncClient, front: Front) -> None:
    job_id = (await _submit(client)).json()["inference_id"]
    view = (await client.get(f"/async-invocations/{job_id}")).json()
    assert (view["status"], view["attempts"], view["max_attempts"], view["started_at"]) == (
        "queued",
        0,
        2,
        None,
    )
    assert "queued" in _error(await client.get(f"/async-invocations/{job_id}/output"), 409, "conflict")

    (lease,) = front.queue.lease("twin", "test", visibility_timeout_s=30)
    view = (await client.get(f"/async-invocations/{job_id}")).json()
    assert (view["status"], view["attempts"]) == ("running", 1) and view["started_at"] is not None
    assert "running" in _error(await client.get(f"/async-invocations/{job_id}/output"), 409, "conflict")

    answer = b'[{"generated_text": "hello there"}]'
    assert front.queue.complete(lease, front.results.put_success(job_id, answer, "application/json"))
    view = (await client.get(f"/async-invocations/{job_id}")).json()
    assert view["status"] == "succeeded" and view["finished_at"] is not None
    out = await client.get(f"/async-invocations/{job_id}/output")
    assert out.status_code == 200 and out.content == answer
    assert out.headers["x-job-status"] == "succeeded"
    assert out.headers["content-type"].startswith("application/json")


async def test_a_failed_job_answers_its_error_body(client: httpx.AsyncClient, front: Front) -> None:
    job_id = (await _submit(client)).json()["inference_id"]
    (lease,) = front.queue.lease("twin", "test", visibility_timeout_s=30)
    error = b'{"error": "`inputs` too long", "error_type": "validation"}'
    location = front.results.put_failure(job_id, error)
    front.queue.fail(
        lease, "the endpoint answered HTTP 422 (validation)", retry=False, failure_location=location
    )
    view = (await client.get(f"/async-invocations/{job_id}")).json()
    assert (
        view["status"] == "failed" and view["failure_reason"] == "the endpoint answered HTTP 422 (validation)"
    )
    assert view["failure_location"] == location
    out = await client.get(f"/async-invocations/{job_id}/output")
    assert (out.status_code, out.content, out.headers["x-job-status"]) == (200, error, "failed")


async def test_an_expired_job_answers_why(client: httpx.AsyncClient, front: Front) -> None:
    job_id = (await _submit(client, **{"X-Request-TTL-Seconds": "60"})).json()["inference_id"]
    later = datetime.now(UTC) + timedelta(hours=1)
    assert front.queue.lease("twin", "test", visibility_timeout_s=30, now=later) == []
    assert (await client.get(f"/async-invocations/{job_id}")).json()["status"] == "expired"
    out = await client.get(f"/async-invocations/{job_id}/output")
    assert out.status_code == 200 and out.headers["x-job-status"] == "expired"
    assert out.json()["error_type"] == "expired" and "TTL" in out.json()["error"]


async def test_unknown_ids_and_other_endpoints_jobs_are_404(client: httpx.AsyncClient, front: Front) -> None:
    front.queue.submit(Job(inference_id="elsewhere", endpoint="other", body=b"{}"))
    for job_id in ["nope", "elsewhere"]:
        _error(await client.get(f"/async-invocations/{job_id}"), 404, "not_found")
        _error(await client.get(f"/async-invocations/{job_id}/output"), 404, "not_found")
    _error(await client.get("/no/such/route"), 404, "not_found")


# ------------------------------------------------------------------ key, health, stats, metrics


async def test_the_api_key_guards_the_job_routes_only(front: Front) -> None:
    transport = httpx.ASGITransport(app=front.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobs") as anon:
        for headers in [{}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}]:
            r = await anon.post("/async-invocations", json=TGI, headers=headers)
            _error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            _error(await anon.get("/async-invocations/x", headers=headers), 401, "unauthorized")
        assert (
            await anon.post("/async-invocations", json=TGI, headers={"x-api-key": KEY})
        ).status_code == 202
        for path in ["/async/health", "/async/stats", "/async/metrics"]:
            assert (await anon.get(path)).status_code == 200


async def test_stats_and_metrics_show_the_backlog(client: httpx.AsyncClient, front: Front) -> None:
    for _ in range(3):
        await _submit(client)
    front.queue.lease("twin", "test", visibility_timeout_s=30)
    assert (await client.get("/async/health")).json()["status"] == "ok"
    stats = (await client.get("/async/stats")).json()
    assert stats == {
        "backlog": 3,
        "counts": {"queued": 2, "running": 1, "succeeded": 0, "failed": 0, "expired": 0},
        "replicas": 0,
        "capacity": 0,
        "in_flight": 0,
    }
    r = await client.get("/async/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'twinserve_async_queue_depth{endpoint="twin",status="queued"} 2.0' in text
    assert 'twinserve_async_queue_depth{endpoint="twin",status="running"} 1.0' in text
    assert 'twinserve_async_backlog_per_replica{endpoint="twin"} 3.0' in text  # no replica: all of it
    for outcome in ["succeeded", "failed", "retried", "lease_lost"]:
        assert f'twinserve_async_jobs_total{{endpoint="twin",outcome="{outcome}"}} 0.0' in text
    assert 'twinserve_async_notifications_total{outcome="delivered"} 0.0' in text
    assert "# TYPE twinserve_async_job_duration_seconds histogram" in text
