"""`twinserve batch …`: batch transform jobs (create, resume, describe, list, stop, wait, logs).

Thin: parses, checks what can be checked before anything starts (input, output, model
reference or endpoint, JSONPath), writes the job's state folder and runs the job. `create`
and `resume` start the job in a detached process (it survives the terminal; `batch wait`
or `describe` follow it later) and follow it with a progress bar unless `--no-wait`;
`--foreground` runs it in this process instead. Exit codes: 0 ok (CompletedWithErrors too:
the counts say how many failed), 1 not found / the job failed or stopped, 2 bad flags or config.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from twinserve.cli.output import err, fail, out

if TYPE_CHECKING:
    from twinserve.jobs.batch_spec import JobRecord, TransformJobConfig
    from twinserve.jobs.checkpoints import JobDir

app = typer.Typer(
    help="Batch transform: run a file (or folder, or s3:// prefix) of records through a model, resumably.",
    no_args_is_help=True,
)


def _job(name: str) -> JobDir:
    from twinserve.jobs.checkpoints import JobDir

    job = JobDir(name)
    if not job.exists():
        fail(f"no batch job named {name!r} (`twinserve batch list` shows them)")
    return job


def _parameters(params: list[str], max_new_tokens: int | None) -> dict[str, Any]:
    """`--param KEY=VALUE` (VALUE read as JSON when it parses, else a string)."""
    import json

    out_params: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--param takes KEY=VALUE (got {item!r})", 2)
        try:
            out_params[key.strip()] = json.loads(value)
        except ValueError:
            out_params[key.strip()] = value
    if max_new_tokens is not None:
        out_params["max_new_tokens"] = max_new_tokens
    return out_params


def _check_before_start(cfg: TransformJobConfig) -> None:
    """Everything that would fail the job at once, answered before it starts."""
    from twinserve.errors import TwinserveError, ValidationError
    from twinserve.jobs.batch_io import check_output_writable
    from twinserve.jobs.batch_spec import is_s3, local_path

    try:
        if not is_s3(cfg.input) and not local_path(cfg.input).exists():
            fail(f"input {cfg.input} does not exist")
        check_output_writable(cfg)
        _check_no_earlier_answers(cfg)
        if cfg.platform == "ray":
            from twinserve.platforms.ray.batch import check_cluster

            check_cluster(cfg)  # the [ray] extra, a reachable cluster, room for one actor
        if cfg.model is not None:
            from twinserve.registry.resolve import resolve_model

            resolve_model(cfg.model)
        else:
            from twinserve.deploy.state import StateStore

            assert cfg.endpoint is not None
            StateStore().get_endpoint(cfg.endpoint)
    except ValidationError as exc:
        fail(exc.message, 2)
    except TwinserveError as exc:
        fail(exc.message, 2 if exc.status_code == 422 else 1)


def _check_no_earlier_answers(cfg: TransformJobConfig) -> None:
    """A new job never truncates answers another job wrote into the same folder."""
    from twinserve.jobs.batch_spec import is_s3, local_path

    if is_s3(cfg.input) or is_s3(cfg.output):
        return
    source, folder = local_path(cfg.input), local_path(cfg.output)
    names = [source.name] if source.is_file() else [p.name for p in source.iterdir() if p.is_file()]
    taken = [n for n in sorted(names) if (folder / f"{n}.out").exists() or (folder / f"{n}.err").exists()]
    if taken:
        fail(f"{folder} already holds answers for {', '.join(taken)}; choose another --output", 2)


@app.command("create")
def create_command(
    name: str = typer.Argument(..., help="Job name (a DNS label)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Run in-process: default, models:/…, a folder."
    ),
    endpoint: str | None = typer.Option(None, "--endpoint", "-e", help="Or send records to this endpoint."),
    input_: str = typer.Option(..., "--input", "-i", help="Input file, folder, or s3:// prefix."),
    output: str = typer.Option(..., "--output", "-o", help="Output folder or s3:// prefix."),
    record_format: str = typer.Option("auto", "--format", help="auto | tgi | chat | text | openai-batch"),
    split_type: str = typer.Option("Line", "--split-type", help="Line | None (a whole file is one record)."),
    batch_strategy: str = typer.Option("MultiRecord", "--batch-strategy", help="SingleRecord | MultiRecord"),
    max_payload_mb: int = typer.Option(6, "--max-payload-mb", help="Largest record, MB."),
    concurrency: int = typer.Option(64, "--max-concurrent-transforms", "-c", help="Records in flight."),
    input_filter: str | None = typer.Option(None, "--input-filter", help="JSONPath, e.g. $.inputs"),
    output_filter: str | None = typer.Option(
        None, "--output-filter", help="JSONPath, e.g. $[0].generated_text"
    ),
    join_source: str = typer.Option("None", "--join-source", help="None | Input"),
    assemble_with: str = typer.Option("Line", "--assemble-with", help="Line | None"),
    accept: str = typer.Option("application/jsonlines", "--accept"),
    param: list[str] = typer.Option([], "--param", "-p", help="Default generation parameter KEY=VALUE."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Shorthand for --param."),
    dtype: str = typer.Option("auto", "--dtype", help="In-process: auto | bfloat16 | float16 | float32"),
    device: str = typer.Option("auto", "--device", help="In-process: auto | cpu | cuda"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="In-process: CPU threads."),
    platform: str = typer.Option("local", "--platform", help="local | ray (a Ray Data actor pool)."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray: auto (default) | HOST:PORT | ray://HOST:10001."
    ),
    actors: int | None = typer.Option(None, "--actors", help="Ray: actors in the pool, one engine each (2)."),
    actor_cpus: float | None = typer.Option(
        None, "--actor-cpus", help="Ray: CPUs per actor (--threads or 1)."
    ),
    actor_gpus: float | None = typer.Option(None, "--actor-gpus", help="Ray: GPUs per actor (1 for cuda)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job's progress until it ends."),
    foreground: bool = typer.Option(False, "--foreground", help="Run in this process, not a detached one."),
) -> None:
    """Create a job and start it."""
    from pydantic import ValidationError

    from twinserve.jobs.batch_spec import JobRecord, TransformJob, TransformJobConfig
    from twinserve.jobs.checkpoints import JobDir

    values = {
        "name": name,
        "model": model,
        "endpoint": endpoint,
        "input": input_,
        "output": output,
        "record_format": record_format,
        "split_type": split_type,
        "batch_strategy": batch_strategy,
        "max_payload_mb": max_payload_mb,
        "max_concurrent_transforms": concurrency,
        "input_filter": input_filter,
        "output_filter": output_filter,
        "join_source": join_source,
        "assemble_with": assemble_with,
        "accept": accept,
        "parameters": _parameters(param, max_new_tokens),
        "dtype": dtype,
        "device": device,
        "num_threads": threads,
        "platform": platform,
    }
    ray = {"address": ray_address, "actors": actors, "num_cpus": actor_cpus, "num_gpus": actor_gpus}
    if any(value is not None for value in ray.values()):
        values["ray"] = {key: value for key, value in ray.items() if value is not None}
    try:
        cfg = TransformJobConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors())
        fail(f"invalid job: {problems}", 2)
    for location in ("input", "output"):
        value = getattr(cfg, location)
        if not value.startswith("s3://"):  # the detached runner may start elsewhere
            cfg = cfg.model_copy(update={location: str(Path(value).expanduser().resolve())})
    job = JobDir(name)
    if job.exists():
        fail(f"batch job {name!r} exists; `twinserve batch resume {name}` continues it", 1)
    _check_before_start(cfg)
    job.save(JobRecord(config=cfg, state=TransformJob(name=name)))
    _start(job, wait=wait, foreground=foreground)


@app.command("resume")
def resume_command(
    name: str = typer.Argument(...),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    foreground: bool = typer.Option(False, "--foreground"),
) -> None:
    """Continue a stopped, failed or killed job from its last checkpoint."""
    job = _job(name)
    state = job.load().state
    if state.status.value in ("Completed", "CompletedWithErrors"):
        out.print(f"{name} is already {state.status.value}; nothing to resume")
        return
    if job.is_running():
        fail(f"{name} is running; `twinserve batch wait {name}` follows it", 1)
    _start(job, wait=wait, foreground=foreground)


def _start(job: JobDir, *, wait: bool, foreground: bool) -> None:
    if foreground:
        from twinserve.jobs.transform import run_job

        done = threading.Event()
        follower = threading.Thread(target=_follow, args=(job, None, done), daemon=True)
        follower.start()
        try:
            run_job(job.name)
        finally:
            done.set()
            follower.join()
        _exit_for(job)
    job.path.mkdir(parents=True, exist_ok=True)
    with job.log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "twinserve.cli.batch", "run-worker", job.name],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in this terminal does not reach the job
        )
    if not wait:
        out.print(
            f"started {job.name} (pid {proc.pid}); `twinserve batch describe {job.name}` shows its progress"
        )
        return
    try:
        _follow(job, proc)
    except KeyboardInterrupt:
        out.print(
            f"\n{job.name} goes on in the background; `twinserve batch wait {job.name}` follows it again"
        )
        raise typer.Exit(0) from None
    _exit_for(job)


def _follow(job: JobDir, proc: subprocess.Popen[bytes] | None, done: threading.Event | None = None) -> None:
    """A progress bar (records, records/s, tokens/s, ETA) until the job ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rates]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(job.name, total=None, rates="")
        started = time.monotonic()
        while True:
            state = _read_state(job)
            if state is not None:
                seconds = max(state.transform_seconds, 1e-9)
                rates = (
                    f"{state.records_done / seconds:.1f} rec/s {state.generated_tokens / seconds:.0f} tok/s"
                )
                progress.update(
                    task,
                    total=state.records_total,
                    completed=state.records_done,
                    rates=rates,
                    description=f"{job.name} {state.status.value}",
                )
                if state.status.is_terminal:
                    return
            if done is not None and done.is_set():
                return
            if proc is not None and proc.poll() is not None and time.monotonic() - started > 1:
                return  # the runner exited without a final state: describe tells what is known
            time.sleep(0.5)


def _read_state(job: JobDir) -> Any:
    try:
        return job.load().state
    except (OSError, ValueError):
        return None  # mid-rename, or a first write still on its way


def _exit_for(job: JobDir) -> NoReturn:
    state = job.load().state
    summary = f"{job.name}: {state.status.value}, {state.records_succeeded} ok, {state.records_failed} failed"
    if state.failure_reason:
        summary += f" ({state.failure_reason})"
    if state.status.value in ("Completed", "CompletedWithErrors"):
        out.print(summary, highlight=False, markup=False)
        raise typer.Exit(0)
    err.print(summary, highlight=False, markup=False)
    raise typer.Exit(1)


@app.command("run-worker", hidden=True)
def run_worker_command(name: str = typer.Argument(...)) -> None:
    """The detached runner `create` and `resume` start."""
    from twinserve.errors import BusyError
    from twinserve.jobs.transform import run_job

    try:
        state = run_job(name)
    except BusyError as exc:
        fail(exc.message, 1)
    raise typer.Exit(0 if state.status.value in ("Completed", "CompletedWithErrors") else 1)


@app.command("describe")
def describe_command(name: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Status, counts, tokens and timings of a job."""
    from twinserve.cli.batch_view import describe_table, describe_value

    job = _job(name)
    record = job.load()
    running = job.is_running()
    if as_json:
        out.print_json(data=describe_value(record, running))
        return
    out.print(describe_table(record, running))


@app.command("list")
def list_command() -> None:
    """Every job in this TWINSERVE_HOME."""
    from twinserve.cli.batch_view import list_table
    from twinserve.jobs.checkpoints import list_jobs

    records: list[tuple[JobRecord, bool]] = [(j.load(), j.is_running()) for j in list_jobs()]
    out.print(list_table(records))


@app.command("stop")
def stop_command(
    name: str = typer.Argument(...), wait: bool = typer.Option(True, "--wait/--no-wait")
) -> None:
    """Ask a running job to stop; committed answers stay and `resume` continues it."""
    job = _job(name)
    record = job.load()
    if record.state.status.is_terminal:
        out.print(f"{name} is already {record.state.status.value}")
        return
    if not job.is_running():  # killed: nothing runs, mark it so
        from twinserve.jobs.batch_spec import JobStatus

        record.state.status = JobStatus.STOPPED
        job.save(record)
        out.print(f"{name} was not running; marked Stopped")
        return
    job.stop_path.touch()
    if wait:
        while job.is_running():
            time.sleep(0.2)
    out.print(f"{name}: {job.load().state.status.value}")


@app.command("wait")
def wait_command(name: str = typer.Argument(...)) -> None:
    """Follow a job until it ends (exit 1 when it failed or stopped)."""
    job = _job(name)
    if job.is_running():
        _follow(job, None, _stopped_event(job))
    _exit_for(job)


def _stopped_event(job: JobDir) -> threading.Event:
    """Set once the job's runner lets go of its lock (it ended, or was killed)."""
    event = threading.Event()

    def watch() -> None:
        while job.is_running():
            time.sleep(0.5)
        time.sleep(0.6)  # one more read of its final state
        event.set()

    threading.Thread(target=watch, daemon=True).start()
    return event


@app.command("logs")
def logs_command(name: str = typer.Argument(...), lines: int = typer.Option(100, "--lines", "-n")) -> None:
    """The last lines of the job runner's log."""
    from twinserve.server.process import tail_lines

    job = _job(name)
    sys.stdout.write(tail_lines(job.log_path, lines))


if __name__ == "__main__":  # the detached runner: python -m twinserve.cli.batch run-worker NAME
    app()
