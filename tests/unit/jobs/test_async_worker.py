"""The job service's workers against a real `twinserve serve` (tiny Llama) behind a real router,
over a real SQLite queue and file results; then the service itself as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ThreadServer, asgi_in_thread, serve_config, thread_server, until, webhook_receiver
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus
from twinserve.deploy.state import StateStore
from twinserve.errors import NotFoundError
from twinserve.jobs.async_service import purge_if_deleted
from twinserve.jobs.async_settings import AsyncSettings, LiveEndpoint
from twinserve.jobs.async_worker import AsyncWorker, WorkerOptions
from twinserve.jobs.model import Job, JobStatus
from twinserve.jobs.notify import Notification, verify_signature
from twinserve.platforms.local.router.app import RouterApp, create_router_app
from twinserve.platforms.local.router.pool import ReplicaPool, ReplicaSpec
from twinserve.server.process import free_port, is_healthy

pytestmark = pytest.mark.anyio

KEY = "worker-key"
SECRET = "whsec-test"
REPO = Path(__file__).resolve().parents[3]
TGI = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
PROMPT = {"prompt": "once upon", "max_tokens": 4}
# passes the request models, refused by the replica: longer than its max_total_tokens (256)
TOO_LONG = {"inputs": "hello", "parameters": {"max_new_tokens": 1000}}
# cannot finish within a 20 ms invocation timeout
SLOW = {"inputs": "hello", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def replica(tiny_model_dir: Path) -> Iterator[ThreadServer]:
    with thread_server(serve_config(tiny_model_dir, warmup=False, api_key=KEY)) as server:
        yield server


@contextlib.contextmanager
def router(specs: list[ReplicaSpec]) -> Iterator[tuple[str, RouterApp]]:
    """The real router app in a thread (health checks every 0.2 s), with the endpoint's key."""
    app = create_router_app(ReplicaPool(specs), api_key=KEY, health_interval=0.2)
    with asgi_in_thread(app, "test-router") as url:
        yield url, app


@pytest.fixture(scope="module")
def router_url(replica: ThreadServer) -> Iterator[str]:
    with router([ReplicaSpec(id="a", url=replica.url)]) as (url, _):
        assert until(lambda: is_healthy(url), 30)
        yield url


def _endpoint(url: str | None, **config: Any) -> Endpoint:
    async_config = {"max_concurrent_invocations_per_replica": 2, "max_attempts": 2, **config}
    cfg = EndpointConfig.single("twin", "models:/llm-twin/1", api_key=KEY, async_inference=async_config)
    return Endpoint.new(cfg).model_copy(update={"status": EndpointStatus.IN_SERVICE, "url": url})


@dataclass
class Workers:
    worker: AsyncWorker
    settings: AsyncSettings

    @property
    def queue(self) -> Any:
        return self.worker.queue

    def submit(self, body: Any = TGI, **fields: Any) -> str:
        job = Job(endpoint="twin", body=json.dumps(body).encode(), max_attempts=2, **fields)
        return self.queue.submit(job).inference_id

    async def final(self, job_id: str, timeout: float = 60) -> Job:
        assert await eventually(lambda: self.queue.get(job_id).status.is_final, timeout), self.queue.get(
            job_id
        )
        assert await eventually(lambda: self.worker.in_flight == 0, timeout)  # metrics, webhooks counted
        job: Job = self.queue.get(job_id)
        return job

    def read(self, location: str | None) -> Any:
        assert location is not None
        return json.loads(self.worker.results.get(location))


async def eventually(condition: Callable[[], Any], timeout: float = 60) -> bool:
    """`tests.servers.until` for the event loop: the workers run in it meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return False


WorkersFactory = Callable[..., Awaitable[Workers]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[WorkersFactory]:
    """Start workers for an endpoint record; each is stopped (drained) at the end."""
    running: list[tuple[AsyncWorker, asyncio.Task[None]]] = []

    async def factory(endpoint: Endpoint) -> Workers:
        settings = AsyncSettings.of(endpoint, home=tmp_path / "home", state_path=tmp_path / "state.db")
        worker = AsyncWorker(
            settings,
            LiveEndpoint(endpoint),
            settings.open_queue(),
            settings.open_results(),
            settings.notifier(),
            options=WorkerOptions(visibility_timeout_s=10, poll_interval_s=0.05),
        )
        running.append((worker, asyncio.create_task(worker.run())))
        return Workers(worker, settings)

    yield factory
    for worker, task in running:
        await worker.drain(30)
        await task


def _metric(workers: Workers, name: str, **labels: str) -> float:
    value = workers.worker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ------------------------------------------------------------------ running jobs


async def test_jobs_run_once_and_their_answers_are_stored(router_url: str, start: WorkersFactory) -> None:
    w = await start(_endpoint(router_url))
    ids = [w.submit(TGI), w.submit(CHAT), w.submit(PROMPT)]
    jobs = [await w.final(job_id) for job_id in ids]
    assert [(j.status, j.attempts) for j in jobs] == [(JobStatus.SUCCEEDED, 1)] * 3
    tgi, chat, completion = (w.read(j.output_location) for j in jobs)
    assert isinstance(tgi, list) and isinstance(tgi[0]["generated_text"], str)  # /invocations' TGI shape
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert completion["object"] == "text_completion"
    folder = Path(jobs[0].output_location.removeprefix("file://")).parent  # type: ignore[union-attr]
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(f"{i}.out" for i in ids)
    assert _metric(w, "twinserve_async_jobs_total", endpoint="twin", outcome="succeeded") == 3
    assert _metric(w, "twinserve_async_job_duration_seconds_count", endpoint="twin") == 3
    assert w.worker.healthy == 1 and w.worker.capacity == 2


async def test_inputs_by_location_are_read_by_the_worker(router_url: str, start: WorkersFactory) -> None:
    w = await start(_endpoint(router_url))
    inputs = w.settings.input_roots[0]
    inputs.mkdir(parents=True)
    (inputs / "ok.json").write_text(json.dumps(TGI))
    (inputs / "stream.json").write_text(json.dumps({**TGI, "stream": True}))
    ok = w.queue.submit(Job(endpoint="twin", input_location=(inputs / "ok.json").as_uri())).inference_id
    gone = w.queue.submit(Job(endpoint="twin", input_location=(inputs / "gone.json").as_uri())).inference_id
    stream = w.queue.submit(
        Job(endpoint="twin", input_location=(inputs / "stream.json").as_uri())
    ).inference_id
    assert (await w.final(ok)).status is JobStatus.SUCCEEDED
    for job_id, error_type in [(gone, "not_found"), (stream, "validation")]:
        job = await w.final(job_id)
        assert (job.status, job.attempts) == (JobStatus.FAILED, 1)  # bad input: not retried
        assert job.failure_reason is not None and job.failure_reason.startswith("input: ")
        assert w.read(job.failure_location)["error_type"] == error_type


async def test_a_body_the_replica_refuses_fails_for_good_with_its_error(
    router_url: str, start: WorkersFactory
) -> None:
    w = await start(_endpoint(router_url))
    job = await w.final(w.submit(TOO_LONG))
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    assert job.failure_reason == "the endpoint answered HTTP 422 (validation)"  # one line, no body
    error = w.read(job.failure_location)
    assert error["error_type"] == "validation" and "max_new_tokens" in error["error"]  # the replica's own
    assert job.output_location is None
    assert _metric(w, "twinserve_async_jobs_total", endpoint="twin", outcome="failed") == 1


async def test_attempts_that_time_out_are_retried_then_failed(router_url: str, start: WorkersFactory) -> None:
    w = await start(_endpoint(router_url))
    job = await w.final(w.submit(SLOW, invocation_timeout_s=0.02))
    assert (job.status, job.attempts) == (JobStatus.FAILED, 2)
    assert job.failure_reason == "no answer within 0.02 s (attempt 2 of 2)"
    assert w.read(job.failure_location) == {"error": job.failure_reason, "error_type": "timeout"}
    assert _metric(w, "twinserve_async_jobs_total", endpoint="twin", outcome="retried") == 1
    assert _metric(w, "twinserve_async_jobs_total", endpoint="twin", outcome="failed") == 1


async def test_webhooks_are_signed_and_carry_the_answer(router_url: str, start: WorkersFactory) -> None:
    with webhook_receiver() as (hook, received):
        endpoint = _endpoint(
            router_url,
            notify_success_url=f"{hook}/ok",
            notify_error_url=f"{hook}/error",
            notify_secret=SECRET,
        )
        w = await start(endpoint)
        good, bad = w.submit(TGI), w.submit(TOO_LONG)
        await w.final(good)
        await w.final(bad)
        assert await eventually(lambda: len(received) == 2, 30)
    by_path = {r.path: r for r in received}
    for request in received:
        assert verify_signature(
            SECRET,
            request.body,
            request.headers["x-twinserve-timestamp"],
            request.headers["x-twinserve-signature"],
        )
    ok = Notification.model_validate_json(by_path["/ok"].body)
    assert (ok.inference_id, ok.status.value, ok.endpoint) == (good, "Completed", "twin")
    assert ok.response_inlined and ok.response == w.read(w.queue.get(good).output_location)
    error = Notification.model_validate_json(by_path["/error"].body)
    assert (error.inference_id, error.status.value) == (bad, "Failed")
    assert error.failure_reason == "the endpoint answered HTTP 422 (validation)"
    assert error.failure_location == w.queue.get(bad).failure_location
    # counted once the receiver's answer is in, a moment after it recorded the request
    assert await eventually(
        lambda: _metric(w, "twinserve_async_notifications_total", outcome="delivered") == 2
    )


async def test_an_expired_job_is_counted_and_sent_to_the_error_webhook(
    router_url: str, start: WorkersFactory
) -> None:
    with webhook_receiver() as (hook, received):
        w = await start(_endpoint(router_url, notify_error_url=f"{hook}/error"))
        stale = w.submit(TGI, ttl_s=0.001)  # no worker can start it in time
        assert (await w.final(stale)).status is JobStatus.EXPIRED
        assert await eventually(lambda: len(received) == 1, 30)
        fresh = w.submit(TGI)  # later rounds do not report the same expiry again
        assert (await w.final(fresh)).status is JobStatus.SUCCEEDED
    event = Notification.model_validate_json(received[0].body)
    assert (event.inference_id, event.status.value) == (stale, "Failed")
    assert event.failure_reason and "expired" in event.failure_reason.lower()
    assert received[0].path == "/error" and len(received) == 1
    assert _metric(w, "twinserve_async_jobs_total", endpoint="twin", outcome="expired") == 1


# ------------------------------------------------------------------ capacity


async def test_nothing_is_leased_without_a_healthy_replica(
    replica: ThreadServer, start: WorkersFactory
) -> None:
    with router([]) as (url, app):  # scaled to zero: the router runs, no replica does
        w = await start(_endpoint(url))
        job_id = w.submit(TGI)
        await asyncio.sleep(0.5)  # ten rounds of the workers
        job = w.queue.get(job_id)
        assert (job.status, job.attempts, w.worker.healthy, w.worker.capacity) == (JobStatus.QUEUED, 0, 0, 0)
        app.pool.set_replicas([ReplicaSpec(id="a", url=replica.url)])  # the controller woke one
        assert (await w.final(job_id)).status is JobStatus.SUCCEEDED


async def test_an_unreachable_router_leases_nothing(start: WorkersFactory) -> None:
    w = await start(_endpoint(f"http://127.0.0.1:{free_port()}"))
    job_id = w.submit(TGI)
    await asyncio.sleep(0.5)
    job = w.queue.get(job_id)
    assert (job.status, job.attempts, w.worker.healthy) == (JobStatus.QUEUED, 0, 0)  # no attempt burnt


async def test_the_drain_lets_running_jobs_finish(router_url: str, start: WorkersFactory) -> None:
    w = await start(_endpoint(router_url, max_concurrent_invocations_per_replica=1))
    job_id = w.submit(SLOW)
    assert await eventually(lambda: w.queue.get(job_id).status is JobStatus.RUNNING)
    queued = w.submit(TGI)  # no room for it while the first runs
    assert await w.worker.drain(60) == 0
    assert w.queue.get(job_id).status is JobStatus.SUCCEEDED
    assert w.queue.get(queued).status is JobStatus.QUEUED  # left for the next service


# ------------------------------------------------------------------ the service process


def test_the_queue_is_purged_only_when_the_endpoint_is_deleted(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    endpoint = store.put_endpoint(_endpoint(None))
    queue = AsyncSettings.of(endpoint, home=tmp_path, state_path=store.path).open_queue()
    job_id = queue.submit(Job(endpoint="twin", body=b"{}")).inference_id
    assert not purge_if_deleted(store, "twin", queue) and queue.get(job_id)  # InService: kept
    store.delete_endpoint("twin")
    assert purge_if_deleted(store, "twin", queue)  # gone: purged
    with pytest.raises(NotFoundError):
        queue.get(job_id)


@contextlib.contextmanager
def service_process(
    name: str, port: int, state: Path, home: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "twinserve.jobs.async_service", "--endpoint", name, "--port", str(port)]
    cmd += ["--state", str(state), "--home", str(home), "--poll-interval", "0.05"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_service_process_serves_jobs_and_exits_0_on_sigterm(
    replica: ThreadServer, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    store = StateStore(home / "endpoints" / "state.db")
    store.put_endpoint(_endpoint(None))
    port = free_port()
    service = f"http://127.0.0.1:{port}"
    log = tmp_path / "async.log"
    with (
        router([ReplicaSpec(id="a", url=replica.url)]) as (url, app),
        service_process("twin", port, store.path, home, log) as proc,
    ):
        store.update_endpoint("twin", lambda ep: ep.model_copy(update={"url": url, "async_url": service}))
        assert until(lambda: is_healthy(service, path="/async/health") or proc.poll() is not None, 60)
        assert proc.poll() is None, log.read_text()
        app.async_upstream = service  # what the router's store sync does for a real endpoint
        auth = {"authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{url}/async-invocations", json=TGI, headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        job_id, output = r.json()["inference_id"], r.json()["output_location"]

        def status() -> str:
            return str(
                httpx.get(f"{url}/async-invocations/{job_id}", headers=auth, timeout=10).json()["status"]
            )

        assert until(lambda: status() in ("succeeded", "failed"), 60) and status() == "succeeded"
        answer = httpx.get(f"{url}/async-invocations/{job_id}/output", headers=auth, timeout=10)
        assert answer.status_code == 200 and answer.headers["x-job-status"] == "succeeded"
        assert isinstance(answer.json()[0]["generated_text"], str)

        def stats() -> tuple[int, ...]:
            data = httpx.get(f"{service}/async/stats", timeout=10).json()
            return (data["backlog"], data["replicas"], data["capacity"], data["in_flight"])

        assert until(lambda: stats() == (0, 1, 2, 0), 30), stats()  # in_flight: the task ends after complete

        store.update_endpoint("twin", lambda ep: ep.model_copy(update={"status": EndpointStatus.DELETING}))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    settings = AsyncSettings.of(store.get_endpoint("twin"), home=home, state_path=store.path)
    with pytest.raises(NotFoundError):  # the endpoint is being deleted: its queue is purged
        settings.open_queue().get(job_id)
    assert settings.open_results().exists(output)  # the answers stay
    text = log.read_text()
    assert "purged" in text and KEY not in text
