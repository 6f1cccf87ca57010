"""The workers of an async endpoint: lease jobs from the queue, run them through the endpoint's
router, store the answers, settle the leases, send the webhooks.

Concurrency follows the replicas: at most K × healthy jobs run at once, K being
`max_concurrent_invocations_per_replica` (SageMaker's MaxConcurrentInvocationsPerInstance) and
healthy the replicas the router reports healthy and not draining (`GET /router/replicas`, read
again every round). No healthy replica — scaled to zero, or the router unreachable — means
nothing is leased: the jobs wait in the queue (the controller wakes a variant on backlog), and
no attempt is spent on a call that cannot succeed.

One attempt of a job (`_attempt`), and what becomes of it (`_settle`):
```
2xx                              put_success → complete → success webhook (if complete won)
4xx but 408/429, bad input       put_failure(the error body) → fail(retry=False) → error webhook
408/429/5xx, transport, timeout  fail(retry=True) while attempts remain; on the last one a
                                 TGI-shaped {"error","error_type"} → fail(retry=False) → error webhook
```
Jobs the queue expired (not started within their TTL) are found every few seconds, counted and
sent to the error webhook (`failure_reason` says so; there is no error body).

A lease lasts `visibility_timeout_s` and is extended every third of it while the job runs; a
lost lease (LeaseLostError: it ran out and another worker holds the job) stops the work, and
its result would not count. Queue and store calls are blocking (SQLite, Redis, files, S3), so
they run in threads and the event loop keeps serving the front. Failure reasons are one line
and never carry a body (inputs and answers are the users' data); webhooks never fail a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx

from twinserve.errors import ClientError, TwinserveError
from twinserve.jobs.async_front import AsyncMetrics, check_invocation_body
from twinserve.jobs.async_settings import AsyncSettings, LiveEndpoint
from twinserve.jobs.locations import read_input
from twinserve.jobs.model import Job, JobStatus, Lease
from twinserve.jobs.notify import Notification, NotificationStatus, Notifier
from twinserve.jobs.queue import MAX_LEASE_BATCH, JobQueue, LeaseLostError
from twinserve.jobs.results import ResultStore

log = logging.getLogger(__name__)

_REPLICAS_TIMEOUT_S = 2.0
_EXPIRY_SWEEP_S = 5.0  # how often expired jobs are looked for (to count them and notify)
_EXPIRY_BATCH = 100
_ERROR_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_REASON_CHARS = 300


@dataclass(frozen=True)
class WorkerOptions:
    """How the workers lease and poll."""

    visibility_timeout_s: float = 30.0  # a lease not extended for this long is redelivered
    poll_interval_s: float = 0.2  # between rounds (replica count, lease) when nothing happens


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to; `body` is the answer (success) or the error body (permanent)."""

    kind: Literal["success", "permanent", "retry"]
    reason: str = ""
    body: bytes = b""
    content_type: str = "application/json"
    error_type: str = "server"


def one_line(text: str) -> str:
    """`text` fit for a failure reason: one line, at most 300 characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _REASON_CHARS else flat[: _REASON_CHARS - 1] + "…"


def error_body(message: str, error_type: str) -> bytes:
    """TGI's error shape, the body stored for failures we describe ourselves."""
    return json.dumps({"error": message, "error_type": error_type}).encode()


def _upstream_error_type(response: httpx.Response) -> str | None:
    """The error_type of a TGI (or type of an OpenAI) error body, when it is a short token."""
    try:
        data = response.json()
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    found = data.get("error_type")
    if found is None and isinstance(data.get("error"), dict):
        found = data["error"].get("type")
    return found if isinstance(found, str) and _ERROR_TYPE.fullmatch(found) else None


def judge(response: httpx.Response) -> Outcome:
    """The outcome of an answer from `POST /invocations` (see the module's table)."""
    status = response.status_code
    if 200 <= status < 300:
        kind = response.headers.get("content-type", "application/json")
        return Outcome("success", body=response.content, content_type=kind)
    upstream = _upstream_error_type(response)
    reason = f"the endpoint answered HTTP {status}" + (f" ({upstream})" if upstream else "")
    if status in (408, 429) or status >= 500:
        fallback = {408: "timeout", 429: "overloaded"}.get(status, "server")
        return Outcome("retry", reason=reason, error_type=upstream or fallback)
    body = response.content or error_body(reason, upstream or "client")
    return Outcome("permanent", reason=reason, body=body, error_type=upstream or "client")


class _Held:
    """A running job's current lease (heartbeats replace it) and whether it is being settled."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.settling = False


class AsyncWorker:
    """Runs an endpoint's jobs; `run` until `request_stop`, then `drain`."""

    def __init__(
        self,
        settings: AsyncSettings,
        live: LiveEndpoint,
        queue: JobQueue,
        results: ResultStore,
        notifier: Notifier,
        *,
        metrics: AsyncMetrics | None = None,
        options: WorkerOptions | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings, self.live, self.queue, self.results = settings, live, queue, results
        self.notifier = notifier
        self.metrics = metrics or AsyncMetrics(settings.endpoint)
        self.options = options or WorkerOptions()
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._client = client or httpx.AsyncClient()
        self._own_client = client is None
        self._jobs: set[asyncio.Task[None]] = set()
        self._notes: set[asyncio.Task[None]] = set()
        self._healthy = 0
        self._replicas_read_at = -float("inf")
        self._router_error: str | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._rounds_over: asyncio.Event | None = None  # set once `run` has left its loop
        # expiries after this instant are reported (webhook, metric); earlier ones were before us
        self._expired_after = datetime.now(UTC)
        self._expiry_swept_at = -float("inf")

    # --- what the front shows (WorkerView) ---

    @property
    def healthy(self) -> int:
        return self._healthy

    @property
    def capacity(self) -> int:
        return self.settings.config.max_concurrent_invocations_per_replica * self._healthy

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # --- the loop ---

    def request_stop(self) -> None:
        """Stop leasing now; safe from a signal handler or another thread."""
        self._stopping = True
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Lease and start jobs, round after round, until `request_stop`."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._rounds_over = asyncio.Event()
        log.info("worker %s running for endpoint %s", self.worker_id, self.settings.endpoint)
        try:
            while not self._stopping:
                try:
                    await self._round()
                except Exception:  # a store or queue hiccup: log it and try again next round
                    log.exception("a worker round failed")
                await self._sleep()
        finally:
            self._rounds_over.set()

    async def _round(self) -> None:
        await self.live.refresh()
        await self._report_expired()
        self._healthy = await self._count_healthy()
        room = self.capacity - len(self._jobs)
        if room <= 0 or self._stopping or not self.live.leasable:
            return
        leases = await asyncio.to_thread(
            self.queue.lease,
            self.settings.endpoint,
            self.worker_id,
            visibility_timeout_s=self.options.visibility_timeout_s,
            limit=min(room, MAX_LEASE_BATCH),
        )
        for lease in leases:  # even when stopping meanwhile: they are ours now, so run them
            task = asyncio.create_task(self._run_job(lease), name=f"job-{lease.job.inference_id}")
            self._jobs.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if self._wake is not None:
            self._wake.set()  # room for another job: no need to wait for the poll interval

    async def _sleep(self) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.options.poll_interval_s)
        self._wake.clear()

    async def _count_healthy(self) -> int:
        """Replicas the router reports healthy and not draining (0 when it cannot be asked),
        read at most once per poll interval."""
        if time.monotonic() - self._replicas_read_at < self.options.poll_interval_s:
            return self._healthy
        self._replicas_read_at = time.monotonic()
        url = self.live.url
        if url is None:
            return 0
        try:
            response = await self._client.get(
                f"{url}/router/replicas", headers=self._auth(), timeout=_REPLICAS_TIMEOUT_S
            )
            response.raise_for_status()
            replicas = response.json()["replicas"]
            count = sum(1 for r in replicas if r.get("status") == "healthy" and not r.get("draining"))
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._router_trouble(type(exc).__name__)
            return 0
        if self._router_error is not None:
            log.info("the router answers again")
            self._router_error = None
        if count != self._healthy:
            log.info("healthy replicas: %d (capacity %d jobs)", count, count * self._per_replica)
        return count

    @property
    def _per_replica(self) -> int:
        return self.settings.config.max_concurrent_invocations_per_replica

    def _router_trouble(self, detail: str) -> None:
        if self._router_error is None:  # once per outage, not every round
            log.warning("the router's replica list cannot be read (%s): leasing nothing", detail)
        self._router_error = detail

    def _auth(self) -> dict[str, str]:
        key = self.live.api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    # --- one job ---

    async def _run_job(self, lease: Lease) -> None:
        """Work on the job while extending its lease; stop at once if the lease is lost."""
        held = _Held(lease)
        work = asyncio.create_task(self._work(held))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=self.options.visibility_timeout_s / 3)
                if not work.done() and not await self._heartbeat(held):
                    work.cancel()
                    break
            with contextlib.suppress(asyncio.CancelledError):
                await work
        except asyncio.CancelledError:  # the drain ran out: the lease expires, the job is redelivered
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise

    async def _heartbeat(self, held: _Held) -> bool:
        """Extend the lease; False when it is lost (and the job is not being settled)."""
        try:
            held.lease = await asyncio.to_thread(
                self.queue.heartbeat, held.lease, self.options.visibility_timeout_s
            )
        except LeaseLostError as exc:
            if held.settling:
                return True  # settling reports it (a redelivered copy may have finished first)
            self._lease_lost(held.lease.job, exc)
            return False
        except Exception as exc:  # a busy store: the lease has time left, try again next beat
            log.warning("heartbeat of %s failed: %s", held.lease.job.inference_id, type(exc).__name__)
        return True

    def _lease_lost(self, job: Job, exc: LeaseLostError) -> None:
        log.warning("job %s: lease lost, stopping (%s)", job.inference_id, exc.message)
        self.metrics.job("lease_lost")

    async def _work(self, held: _Held) -> None:
        job = held.lease.job
        log.info("job %s: attempt %d of %d", job.inference_id, job.attempts, job.max_attempts)
        try:
            outcome = await self._attempt(job)
            held.settling = True
            await self._settle(held.lease, outcome)
        except LeaseLostError as exc:
            self._lease_lost(job, exc)
        except Exception:
            log.exception(
                "job %s: settling failed; the lease runs out and the job is redelivered", job.inference_id
            )

    async def _attempt(self, job: Job) -> Outcome:
        """Read the input, call the endpoint once, and judge the answer."""
        try:
            body = await self._input(job)
        except ClientError as exc:  # the input is missing, refused or too large: it won't change
            reason = one_line(f"input: {exc.message}")
            return Outcome("permanent", reason=reason, body=error_body(reason, exc.error_type))
        except TwinserveError as exc:
            return Outcome("retry", reason=one_line(f"reading the input failed: {exc.message}"))
        url = self.live.url
        if url is None:
            return Outcome("retry", reason="the endpoint has no router URL", error_type="unreachable")
        headers = {
            **self._auth(),
            "content-type": job.content_type,
            "accept": job.accept,
            "x-request-id": job.inference_id,
        }
        timeout = job.invocation_timeout_s
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.post(
                    f"{url}/invocations", content=body, headers=headers, timeout=timeout
                )
        except (TimeoutError, httpx.TimeoutException):
            return Outcome("retry", reason=f"no answer within {timeout:g} s", error_type="timeout")
        except httpx.HTTPError as exc:
            self._distrust_replicas()
            reason = f"the endpoint is unreachable ({type(exc).__name__})"
            return Outcome("retry", reason=reason, error_type="unreachable")
        if response.status_code == 503:  # no replica could take it (all draining, or none left)
            self._distrust_replicas()
        return judge(response)

    def _distrust_replicas(self) -> None:
        """The router or its replicas just failed us: count them again before the next lease,
        so a job is not handed, attempt after attempt, to an endpoint that is down."""
        self._healthy = 0
        self._replicas_read_at = -float("inf")

    async def _input(self, job: Job) -> bytes:
        if job.body is not None:
            return job.body
        assert job.input_location is not None
        data = await asyncio.to_thread(
            read_input,
            job.input_location,
            limit_bytes=self.live.endpoint.config.payload_limit,
            allowed_roots=self.settings.input_roots,
        )
        check_invocation_body(data, job.content_type)  # what the front checks of inline bodies
        return data

    async def _settle(self, lease: Lease, outcome: Outcome) -> None:
        job = lease.job
        if outcome.kind == "success":
            await self._succeed(lease, outcome)
            return
        last = job.attempts >= job.max_attempts
        if outcome.kind == "retry" and not last:
            await asyncio.to_thread(self.queue.fail, lease, outcome.reason, retry=True)
            log.info(
                "job %s: attempt %d failed, retrying: %s", job.inference_id, job.attempts, outcome.reason
            )
            self.metrics.job("retried")
            return
        if outcome.kind == "permanent":
            await self._fail(lease, outcome.reason, outcome.body)
            return
        # a retryable failure on the last attempt: the error body is ours to write
        reason = f"{outcome.reason} (attempt {job.attempts} of {job.max_attempts})"
        await self._fail(lease, reason, error_body(reason, outcome.error_type))

    async def _succeed(self, lease: Lease, outcome: Outcome) -> None:
        job = lease.job
        location = await asyncio.to_thread(
            self.results.put_success, job.inference_id, outcome.body, outcome.content_type
        )
        if not await asyncio.to_thread(self.queue.complete, lease, location):
            log.info("job %s: already settled by another delivery; its answer stands", job.inference_id)
            return
        log.info("job %s: succeeded", job.inference_id)
        self.metrics.job("succeeded", job.created_at, datetime.now(UTC))
        self._notify(
            Notification.of(
                body=outcome.body,
                inference_id=job.inference_id,
                status=NotificationStatus.COMPLETED,
                endpoint=job.endpoint,
                output_location=location,
            )
        )

    async def _fail(self, lease: Lease, reason: str, body: bytes) -> None:
        job = lease.job
        location = await asyncio.to_thread(self.results.put_failure, job.inference_id, body)
        failed = await asyncio.to_thread(
            self.queue.fail, lease, reason, retry=False, failure_location=location
        )
        if failed.status is not JobStatus.FAILED or failed.failure_location != location:
            log.info("job %s: already settled by another delivery (%s)", job.inference_id, failed.status)
            return
        log.info("job %s: failed: %s", job.inference_id, reason)
        self.metrics.job("failed", job.created_at, datetime.now(UTC))
        self._notify(
            Notification.of(
                body=body,
                inference_id=job.inference_id,
                status=NotificationStatus.FAILED,
                endpoint=job.endpoint,
                failure_location=location,
                failure_reason=reason,
            )
        )

    async def _report_expired(self) -> None:
        """Count and notify jobs the queue expired (their TTL ran out before any worker started
        them): the queue does it inside `lease`, so they are found by listing, newest first.
        At most once each; one that expired while no service ran is reported by none."""
        if time.monotonic() - self._expiry_swept_at < _EXPIRY_SWEEP_S:
            return
        self._expiry_swept_at = time.monotonic()
        expired = await asyncio.to_thread(
            self.queue.list, self.settings.endpoint, status=JobStatus.EXPIRED, limit=_EXPIRY_BATCH
        )
        fresh = [j for j in expired if j.finished_at is not None and j.finished_at > self._expired_after]
        for job in sorted(fresh, key=lambda j: j.finished_at or j.created_at):
            assert job.finished_at is not None
            self._expired_after = max(self._expired_after, job.finished_at)
            reason = f"expired: {job.failure_reason or 'no worker started it within its TTL'}"
            log.info("job %s: expired: %s", job.inference_id, reason)
            self.metrics.job("expired", job.created_at, job.finished_at)
            self._notify(
                Notification(
                    inference_id=job.inference_id,
                    status=NotificationStatus.FAILED,
                    endpoint=job.endpoint,
                    failure_reason=reason,
                )
            )

    # --- webhooks ---

    def _notify(self, event: Notification) -> None:
        """Send in the background: a slow receiver must not hold a job slot."""
        if self.notifier.url_for(event) is None:
            return
        task = asyncio.create_task(self._deliver(event), name=f"notify-{event.inference_id}")
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)

    async def _deliver(self, event: Notification) -> None:
        self.metrics.notified(await self.notifier.anotify(event))  # anotify never raises

    # --- stopping ---

    async def drain(self, timeout_s: float) -> int:
        """Stop leasing, give running jobs (then webhooks) up to `timeout_s`, cancel what is left
        (their leases run out and the jobs are redelivered); how many jobs were cut short."""
        self.request_stop()
        deadline = time.monotonic() + max(0.0, timeout_s)
        if self._rounds_over is not None:  # a round may be leasing right now: its jobs count too
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rounds_over.wait(), max(0.0, deadline - time.monotonic()))
        left = 0
        for tasks in (self._jobs, self._notes):  # jobs first: a finishing job adds a webhook
            pending = set(tasks)
            if pending:
                _, still = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
                left += len(still) if tasks is self._jobs else 0
                for task in still:
                    task.cancel()
                await asyncio.gather(*still, return_exceptions=True)
        if self._own_client:
            await self._client.aclose()
        if left:
            log.warning("%d job(s) still running at the end of the drain: left to lease expiry", left)
        return left
