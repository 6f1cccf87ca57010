"""How `twinserve batch describe` and `list` show jobs (rich tables, or plain data for --json)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.table import Table

from twinserve.jobs.batch_spec import JobRecord, JobStatus


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def status_label(record: JobRecord, running: bool) -> str:
    """The status, and what to do about a job whose runner is gone without a final state."""
    status = record.state.status
    if status in (JobStatus.IN_PROGRESS, JobStatus.STOPPING) and not running:
        return f"{status.value} (not running: `twinserve batch resume {record.config.name}` continues it)"
    return status.value


def describe_value(record: JobRecord, running: bool) -> dict[str, Any]:
    state, cfg = record.state, record.config
    seconds = state.transform_seconds
    wall = (
        (state.end_time or dt.datetime.now(tz=dt.UTC).timestamp()) - state.start_time
        if state.start_time
        else None
    )
    return {
        "name": cfg.name,
        "status": state.status.value,
        "running": running,
        "model": cfg.model,
        "endpoint": cfg.endpoint,
        "platform": cfg.platform,
        "ray": None if cfg.ray is None else cfg.ray.model_dump(),
        "input": cfg.input,
        "output": cfg.output,
        "record_format": cfg.record_format,
        "records_total": state.records_total,
        "records_done": state.records_done,
        "records_succeeded": state.records_succeeded,
        "records_failed": state.records_failed,
        "prompt_tokens": state.prompt_tokens,
        "generated_tokens": state.generated_tokens,
        "transform_seconds": round(seconds, 3),
        "wall_seconds": None if wall is None else round(wall, 3),
        "records_per_s": round(state.records_done / seconds, 2) if seconds else None,
        "generated_tokens_per_s": round(state.generated_tokens / seconds, 1) if seconds else None,
        "runs": state.runs,
        "creation_time": _when(state.creation_time),
        "start_time": _when(state.start_time),
        "end_time": _when(state.end_time),
        "failure_reason": state.failure_reason,
        "files": {name: f.model_dump() for name, f in state.files.items()},
    }


def describe_table(record: JobRecord, running: bool) -> Table:
    value = describe_value(record, running)
    table = Table(title=f"batch job {record.config.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("status", status_label(record, running))
    table.add_row(
        "model" if record.config.model else "endpoint", record.config.model or record.config.endpoint or ""
    )
    if record.config.ray is not None:
        ray = record.config.ray
        table.add_row("platform", f"ray at {ray.address}, {ray.actors} actor(s)")
    table.add_row("input → output", f"{value['input']} → {value['output']}")
    total = value["records_total"]
    table.add_row("records", f"{value['records_done']} of {total if total is not None else '?'} done")
    table.add_row("succeeded / failed", f"{value['records_succeeded']} / {value['records_failed']}")
    table.add_row("tokens (prompt / generated)", f"{value['prompt_tokens']} / {value['generated_tokens']}")
    rate = value["generated_tokens_per_s"]
    table.add_row("running time", f"{value['transform_seconds']:.1f} s over {value['runs']} run(s)")
    table.add_row("throughput", "" if rate is None else f"{value['records_per_s']} rec/s, {rate} tok/s")
    table.add_row(
        "created / started / ended", f"{value['creation_time']} / {value['start_time']} / {value['end_time']}"
    )
    if value["failure_reason"]:
        table.add_row("failure reason", value["failure_reason"])
    for name, f in value["files"].items():
        table.add_row(
            f"file {name}", f"{f['records']} records, {f['failed']} failed{', done' if f['done'] else ''}"
        )
    return table


def list_table(records: list[tuple[JobRecord, bool]]) -> Table:
    table = Table(title="batch jobs")
    for column in ("name", "status", "records", "failed", "generated tokens", "created"):
        table.add_column(column)
    for record, running in records:
        state = record.state
        total = state.records_total if state.records_total is not None else "?"
        table.add_row(
            record.config.name,
            status_label(record, running),
            f"{state.records_done}/{total}",
            str(state.records_failed),
            str(state.generated_tokens),
            _when(state.creation_time),
        )
    return table
