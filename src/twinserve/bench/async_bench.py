"""`twinserve bench async`: a burst of jobs on an async endpoint that starts at zero replicas.

One run, one endpoint (local platform, `--autoscale 0..MAX` on the backlog):
1. create it, scale it to 0 and wait until no replica runs;
2. submit `jobs` chat jobs at once (`POST /async-invocations`), greedy, exactly
   `max_new_tokens` each; the controller wakes it from 0 (HasBacklogWithoutCapacity) and scales
   out on the backlog; wait until every job is final;
3. baseline, same run: the same bodies sent synchronously to the endpoint's `/invocations` at
   K × (replicas now running) in flight, K the endpoint's max concurrent invocations per replica
   — the throughput the queue and its workers are measured against.
Reported: time to the first healthy replica from zero, queue wait (created → started) and
end-to-end latency (created → finished) p50/p99, jobs/s over the whole burst and once a replica
serves, the baseline's requests/s and the ratio, and the scaling events of the run.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from twinserve.bench.prompts import chat_messages
from twinserve.config import Dtype

Progress = Callable[[str], None]


class AsyncBenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model folder.")
    jobs: int = Field(200, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    max_replicas: int = Field(2, ge=1, le=8)
    max_concurrent_invocations: int = Field(16, ge=1, description="K: jobs per replica at once.")
    threads: int = Field(1, ge=1, description="CPU threads per replica.")
    dtype: Dtype = "auto"
    timeout_s: float = Field(1800.0, gt=0, description="Give up waiting for the jobs after this.")


class AsyncBenchReport(BaseModel):
    config: AsyncBenchConfig
    submitted: int
    succeeded: int
    failed: int
    submit_seconds: float = Field(description="All submits answered (202) after this many seconds.")
    time_to_first_replica_s: float = Field(description="First submit → first healthy replica.")
    queue_wait_p50_s: float
    queue_wait_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    burst_seconds: float = Field(description="First submit → last job final.")
    jobs_per_s: float = Field(description="Jobs over the whole burst, wake-up included.")
    jobs_per_s_serving: float = Field(description="Jobs from the first healthy replica to the last job.")
    peak_replicas: int
    baseline_concurrency: int
    baseline_replicas: int
    baseline_requests_per_s: float
    ratio: float = Field(description="jobs_per_s_serving ÷ baseline_requests_per_s.")
    scaling_events: list[str]


def run_async_bench(cfg: AsyncBenchConfig, progress: Progress = lambda _: None) -> AsyncBenchReport:
    from twinserve.deploy.state import StateStore
    from twinserve.platforms.local.local_runtime import LocalRuntime
    from twinserve.platforms.local.platform import LocalPlatform

    bodies = [
        {"messages": m, "max_tokens": cfg.max_new_tokens, "ignore_eos": True, "temperature": 0}
        for m in chat_messages(cfg.jobs)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = StateStore(home / "endpoints" / "state.db")
        platform = LocalPlatform(store, LocalRuntime(store, home=home))
        name = "bench-async"
        try:
            return _run(cfg, platform, name, bodies, progress)
        finally:
            progress("deleting the endpoint")
            platform.delete(name)


def _endpoint_config(cfg: AsyncBenchConfig, name: str) -> Any:
    from twinserve.deploy.spec import EndpointConfig

    return EndpointConfig.model_validate(
        {
            "name": name,
            "variants": [{"model": cfg.model, "threads": cfg.threads, "dtype": cfg.dtype}],
            "async": {"max_concurrent_invocations_per_replica": cfg.max_concurrent_invocations},
            "autoscaling": {
                "type": "target_tracking",
                "metric": "backlog_per_replica",
                "target": cfg.max_concurrent_invocations,
                "min_replicas": 0,
                "max_replicas": cfg.max_replicas,
                "lookback_s": 5,
                "scale_out_cooldown_s": 5,
                "scale_in_cooldown_s": 600,  # no scale-in while the baseline runs
            },
        }
    )


def _run(
    cfg: AsyncBenchConfig, platform: Any, name: str, bodies: list[dict[str, Any]], progress: Progress
) -> AsyncBenchReport:
    progress("creating the async endpoint (one replica to start)")
    platform.create(_endpoint_config(cfg, name))
    progress("scaling it to zero")
    platform.scale(name, 0)
    ep = platform.describe(name)
    url = ep.url
    progress(f"submitting {len(bodies)} jobs at once")
    t0 = time.monotonic()
    ids = asyncio.run(_submit_all(url, bodies))
    submit_s = time.monotonic() - t0
    first_replica, peak = _wait_all(platform, name, url, len(ids), t0, cfg.timeout_s, progress)
    burst_end = time.monotonic()
    jobs = asyncio.run(_statuses(url, ids))
    succeeded = [j for j in jobs if j["status"] == "succeeded"]
    waits = [_seconds(j["created_at"], j["started_at"]) for j in succeeded]
    latencies = [_seconds(j["created_at"], j["finished_at"]) for j in succeeded]
    serving_s = max(burst_end - t0 - first_replica, 1e-9)
    replicas = max(platform.describe(name).variants[0].current_replicas, 1)
    concurrency = cfg.max_concurrent_invocations * replicas
    progress(f"baseline: the same {len(bodies)} bodies on /invocations, {concurrency} in flight")
    baseline_s = asyncio.run(_sync_all(url, bodies, concurrency))
    baseline = len(bodies) / baseline_s
    serving_rate = len(succeeded) / serving_s
    events = [
        f"{e.from_replicas} → {e.to_replicas}: {e.reason}" for e in reversed(platform.events(name, limit=20))
    ]
    return AsyncBenchReport(
        config=cfg,
        submitted=len(ids),
        succeeded=len(succeeded),
        failed=len(jobs) - len(succeeded),
        submit_seconds=submit_s,
        time_to_first_replica_s=first_replica,
        queue_wait_p50_s=_pct(waits, 50),
        queue_wait_p99_s=_pct(waits, 99),
        latency_p50_s=_pct(latencies, 50),
        latency_p99_s=_pct(latencies, 99),
        burst_seconds=burst_end - t0,
        jobs_per_s=len(succeeded) / (burst_end - t0),
        jobs_per_s_serving=serving_rate,
        peak_replicas=peak,
        baseline_concurrency=concurrency,
        baseline_replicas=replicas,
        baseline_requests_per_s=baseline,
        ratio=serving_rate / baseline,
        scaling_events=events,
    )


async def _submit_all(url: str, bodies: list[dict[str, Any]]) -> list[str]:
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def submit(body: dict[str, Any]) -> str:
            response = await client.post("/async-invocations", json=body)
            response.raise_for_status()
            return str(response.json()["inference_id"])

        return list(await asyncio.gather(*(submit(b) for b in bodies)))


def _wait_all(
    platform: Any, name: str, url: str, n: int, t0: float, timeout_s: float, progress: Progress
) -> tuple[float, int]:
    """Poll until every job is final; (seconds to the first healthy replica, peak replicas)."""
    first: float | None = None
    peak = 0
    deadline = t0 + timeout_s
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            healthy = platform.describe(name).variants[0].current_replicas
            peak = max(peak, healthy)
            if healthy and first is None:
                first = time.monotonic() - t0
                progress(f"first replica healthy after {first:.1f}s")
            counts = client.get("/async/stats").json()["counts"]
            done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "expired"))
            if done >= n:
                return (first if first is not None else 0.0), peak
            progress(f"{done}/{n} jobs done, {healthy} replica(s)")
            time.sleep(0.5)
    raise TimeoutError(f"the jobs were not done after {timeout_s:.0f}s")


async def _statuses(url: str, ids: list[str]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=16)) as c:
        responses = await asyncio.gather(*(c.get(f"/async-invocations/{i}") for i in ids))
    return [r.json() for r in responses]


async def _sync_all(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def call(body: dict[str, Any]) -> None:
            async with gate:
                (await client.post("/invocations", json=body)).raise_for_status()

        start = time.monotonic()
        await asyncio.gather(*(call(b) for b in bodies))
        return time.monotonic() - start


def _seconds(start: str, end: str | None) -> float:
    if end is None:
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _pct(values: list[float], q: int) -> float:
    clean = sorted(v for v in values if v == v)
    if not clean:
        return float("nan")
    if len(clean) == 1:
        return clean[0]
    return statistics.quantiles(clean, n=100, method="inclusive")[q - 1]
