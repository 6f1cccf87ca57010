"""Chaos: 200 async jobs while replicas, the router and the job service (its workers) are
SIGKILLed at random.

Real processes on the tiny model: two replicas, the router, the job service and the controller
(which replaces dead replicas and restarts a dead router or job service on the same port).
Submits go through the router with fixed inference ids and are retried on any error, as a
client should (a submit is idempotent by id). At the end every one of the 200 jobs has succeeded, and the results folder
holds exactly 200 answers: none lost, none twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.servers import until
from twinserve.deploy.spec import EndpointConfig
from twinserve.jobs.model import JobStatus
from twinserve.jobs.queue import open_queue
from twinserve.platforms.local.platform import LocalPlatform

JOBS = 200
KILLS = 8


def _config(model: Path) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": "chaos",
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [
                {"model": str(model), "replicas": 2, "dtype": "float32", "device": "cpu", "threads": 1}
            ],
            "async": {"max_concurrent_invocations_per_replica": 4, "max_attempts": 10, "lease_timeout_s": 5},
        }
    )


def _submit(url: str, index: int) -> None:
    body = {
        "inputs": f"job {index}: the quick brown fox",
        "parameters": {"max_new_tokens": 16, "ignore_eos": True},
    }
    headers = {"X-Inference-Id": f"job-{index:03d}"}
    for _ in range(600):  # the job service may be down for a moment: retry, same id
        try:
            response = httpx.post(f"{url}/async-invocations", json=body, headers=headers, timeout=10)
            if response.status_code == 202:
                return
        except httpx.HTTPError:
            pass
        threading.Event().wait(0.2)
    raise AssertionError(f"job {index} was never accepted")


def _kill_as_it_goes(manager: LocalPlatform, stop: threading.Event, killed: list[str]) -> None:
    """SIGKILL one process each time another 20 jobs have succeeded: a replica, the job service
    or the router, in an order shuffled once (each kind at least twice)."""
    rng = random.Random(13)
    order = ["replica", "replica", "replica", "job service", "job service", "router", "router", "replica"]
    rng.shuffle(order)
    queue = open_queue(None, state_dir=manager.store.path.parent)
    milestones = [15 + 20 * i for i in range(len(order))]
    while not stop.is_set() and milestones:
        if queue.counts("chaos")[JobStatus.SUCCEEDED] < milestones[0]:
            stop.wait(0.05)
            continue
        ep = manager.store.get_endpoint("chaos")
        kind = order[len(killed)]
        if kind == "replica":
            live = [r for r in manager.store.replicas("chaos") if r.pid and r.state.serves]
            pid = rng.choice(live).pid if live else None
        else:
            pid = ep.async_pid if kind == "job service" else ep.router_pid
        if pid is None:
            stop.wait(0.2)  # it is being replaced: try again in a moment
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed.append(kind)
        milestones.pop(0)


def test_200_jobs_survive_random_kill_9_of_replicas_and_workers(
    manager: LocalPlatform, tiny_model_dir: Path, tmp_path: Path
) -> None:
    ep = manager.create(_config(tiny_model_dir))
    assert ep.url is not None
    url = ep.url
    stop, killed = threading.Event(), list[str]()
    chaos = threading.Thread(target=_kill_as_it_goes, args=(manager, stop, killed), daemon=True)
    chaos.start()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: _submit(url, i), range(JOBS)))
    queue = open_queue(None, state_dir=manager.store.path.parent)

    def all_final() -> bool:
        counts = queue.counts("chaos")
        return counts[JobStatus.QUEUED] + counts[JobStatus.RUNNING] == 0 and sum(counts.values()) == JOBS

    try:
        assert until(all_final, 600)
    finally:
        stop.set()
        chaos.join(timeout=10)
    assert len(killed) == KILLS, killed  # the run really was disturbed, by every kind of kill
    counts = queue.counts("chaos")
    failed = [
        (j.inference_id, j.attempts, j.failure_reason) for j in queue.list("chaos", status=JobStatus.FAILED)
    ]
    assert counts[JobStatus.SUCCEEDED] == JOBS, (counts, killed, failed)
    results = tmp_path / "endpoints" / "chaos" / "results"
    answers = sorted(p.name for p in results.glob("*.out"))
    assert answers == [f"job-{i:03d}.out" for i in range(JOBS)]  # each once, none missing
    for path in results.glob("*.out"):
        assert json.loads(path.read_bytes())[0]["generated_text"]
    jobs = queue.list("chaos", limit=JOBS)
    assert {j.output_location for j in jobs} == {(results / f"{j.inference_id}.out").as_uri() for j in jobs}
