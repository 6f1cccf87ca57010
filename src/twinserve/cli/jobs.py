"""`twinserve jobs …`: the asynchronous jobs of async endpoints (status, result, list).

Reads the endpoints' own queues and result stores (`AsyncSettings`, the same place the job
service writes to), so it answers for a job whose endpoint was scaled to zero, or whose job
service is down; only the submit goes through the endpoint (`endpoint invoke-async`).
Exit codes: 0 ok, 1 not found / the job failed or expired / timed out, 2 bad flags.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import typer

from twinserve.cli.output import fail, out

if TYPE_CHECKING:
    from twinserve.jobs.async_settings import AsyncSettings
    from twinserve.jobs.model import Job

app = typer.Typer(help="Asynchronous inference jobs: status, result, list.", no_args_is_help=True)


def _settings(endpoint: str | None = None) -> list[AsyncSettings]:
    """The settings of every async endpoint in the state store (or of the one named)."""
    from twinserve.config import get_settings
    from twinserve.deploy.state import StateStore
    from twinserve.jobs.async_settings import AsyncSettings

    store = StateStore()
    endpoints = store.list_endpoints()
    if endpoint is not None:
        endpoints = [e for e in endpoints if e.name == endpoint]
        if not endpoints:
            fail(f"no endpoint named {endpoint!r}")
    found = [
        AsyncSettings.of(e, home=get_settings().home, state_path=store.path)
        for e in endpoints
        if e.config.async_inference is not None
    ]
    if endpoint is not None and not found:
        fail(f"endpoint {endpoint!r} is real-time only: it has no jobs", 2)
    return found


def _find(inference_id: str) -> tuple[Job, AsyncSettings]:
    """The job and its endpoint's settings, looked up in each distinct queue."""
    from twinserve.errors import NotFoundError

    seen: set[str] = set()
    for settings in _settings():
        if settings.queue_url in seen:
            continue
        seen.add(settings.queue_url)
        queue = settings.open_queue()
        try:
            job = queue.get(inference_id)
        except NotFoundError:
            continue
        finally:
            queue.close()
        owner = next((s for s in _settings() if s.endpoint == job.endpoint), settings)
        return job, owner
    fail(f"no job {inference_id!r} in the queue of any async endpoint")


def _job_view(job: Job) -> dict[str, object]:
    return job.model_dump(mode="json", exclude={"body"})


@app.command("status")
def status_command(
    inference_id: str = typer.Argument(..., help="The inference id `invoke-async` printed."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON."),
) -> None:
    """Where a job is: queued, running, succeeded, failed or expired, with its locations."""
    job, _ = _find(inference_id)
    if as_json:
        out.print_json(json.dumps(_job_view(job)))
        return
    out.print(
        f"[bold]{job.inference_id}[/bold]  endpoint: {job.endpoint}  status: {job.status}", highlight=False
    )
    out.print(f"attempts {job.attempts}/{job.max_attempts}, submitted {job.created_at:%Y-%m-%d %H:%M:%S} UTC")
    for label, value in (
        ("output", job.output_location),
        ("failure", job.failure_location),
        ("reason", job.failure_reason),
    ):
        if value:
            out.print(f"{label}: {value}", highlight=False, soft_wrap=True)


@app.command("result")
def result_command(
    inference_id: str = typer.Argument(..., help="The inference id `invoke-async` printed."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the job is done."),
    timeout: float = typer.Option(600.0, "--timeout", min=0, help="With --wait: give up after this (s)."),
) -> None:
    """Print a job's answer (the body `/invocations` returned); a failed job's error body goes to
    stderr with exit code 1."""
    job, settings = _find(inference_id)
    deadline = time.monotonic() + timeout
    while not job.status.is_final:
        if not wait:
            fail(f"job {inference_id} is {job.status}; add --wait to wait for it")
        if time.monotonic() >= deadline:
            fail(f"job {inference_id} is still {job.status} after {timeout:g}s")
        time.sleep(0.5)
        job, settings = _find(inference_id)
    results = settings.open_results()
    if job.output_location is not None:
        sys.stdout.buffer.write(results.get(job.output_location))
        sys.stdout.write("\n")
        return
    if job.failure_location is not None:
        sys.stderr.buffer.write(results.get(job.failure_location))
        sys.stderr.write("\n")
    fail(f"job {inference_id} {job.status}: {job.failure_reason or 'no reason recorded'}")


@app.command("list")
def list_command(
    endpoint: str = typer.Argument(..., help="Async endpoint name."),
    status: str | None = typer.Option(None, "--status", help="queued|running|succeeded|failed|expired"),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000),
    as_json: bool = typer.Option(False, "--json", help="Print the jobs as JSON."),
) -> None:
    """The endpoint's jobs, newest first, and its counts by status."""
    from rich.table import Table

    from twinserve.jobs.model import JobStatus

    try:
        wanted = JobStatus(status) if status is not None else None
    except ValueError:
        fail(f"--status is one of {', '.join(s.value for s in JobStatus)}, not {status!r}", 2)
    (settings,) = _settings(endpoint)
    queue = settings.open_queue()
    try:
        jobs = queue.list(endpoint, status=wanted, limit=limit)
        counts = queue.counts(endpoint)
    finally:
        queue.close()
    if as_json:
        out.print_json(json.dumps({"counts": counts, "jobs": [_job_view(j) for j in jobs]}))
        return
    out.print(", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
    table = Table("inference id", "status", "attempts", "submitted (UTC)", "finished (UTC)", "reason")
    for j in jobs:
        finished = f"{j.finished_at:%H:%M:%S}" if j.finished_at else "-"
        table.add_row(
            j.inference_id,
            str(j.status),
            f"{j.attempts}/{j.max_attempts}",
            f"{j.created_at:%Y-%m-%d %H:%M:%S}",
            finished,
            (j.failure_reason or "")[:80],
        )
    out.print(table)
