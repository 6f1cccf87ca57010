"""Run a batch transform job: records in, answers out in input order, resumable at any point.

Up to `max_concurrent_transforms` records are in flight at once (on the in-process engine,
which batches them continuously, or on an endpoint; `platform: ray` runs them on a Ray Data
actor pool instead, see `platforms/ray/batch.py`). They finish out of order; each input
file's `FileWriter` holds early answers in a reorder buffer and writes line i only after
line i-1, so `<input>.out` is always in input order. Failed records go to `<input>.err` with
their line number and reason; none is ever dropped. Every `checkpoint_every_records` records
or `checkpoint_every_s` seconds the written lines are committed (see `checkpoints`), which is
what makes `resume` exact after a crash.

The job ends Completed, CompletedWithErrors (some records failed), Stopped (`batch stop`,
SIGTERM) or Failed (the engine died, the endpoint is unreachable, an input is missing): a
stopped or failed job resumes from its last commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from twinserve.errors import EngineDeadError, ServerError, TwinserveError, UnreachableError
from twinserve.jobs.batch_engine import Outcome, RecordIds
from twinserve.jobs.batch_io import InputFile, list_inputs, output_dir, publish
from twinserve.jobs.batch_output import failure_lines, success_line
from twinserve.jobs.batch_spec import FileProgress, JobRecord, JobStatus, TransformJob, TransformJobConfig
from twinserve.jobs.checkpoints import Checkpoint, FileCheckpoint, JobDir, open_at
from twinserve.jobs.records import (
    InputRecord,
    ParsedRecord,
    RecordFailure,
    count_records,
    iter_records,
    parse_record,
)

log = logging.getLogger(__name__)

_PROGRESS = set(FileProgress.model_fields)


class Target(Protocol):
    """What runs a parsed record: the in-process engine or an endpoint."""

    async def run(self, parsed: ParsedRecord, ids: RecordIds, parameters: dict[str, Any]) -> Outcome: ...

    async def close(self) -> None: ...


def record_key(job: str, file: str, index: int) -> str:
    """A record's id in its answer: the same on every run of the job, unique across jobs."""
    return hashlib.sha256(f"{job}\0{file}\0{index}".encode()).hexdigest()[:24]


def is_fatal(error: BaseException) -> bool:
    """Errors after which no record can succeed: the job fails (and can be resumed)."""
    return isinstance(error, EngineDeadError | UnreachableError)


@dataclass
class RecordResult:
    """What a record leaves in the answer files: its `.out` and `.err` bytes (either may be None)."""

    out: bytes | None
    err: bytes | None
    ok: bool
    prompt_tokens: int = 0
    generated_tokens: int = 0


async def transform_record(
    cfg: TransformJobConfig, target: Target, file: str, record: InputRecord, created: float
) -> RecordResult:
    """One record, parsed, run and turned into its answer lines (the same bytes on every run and
    every platform: ids come from the job, file, record number and creation time). A failed record
    is a result; errors after which no record can succeed (`is_fatal`) are raised."""
    ids = RecordIds(record_key(cfg.name, file, record.index), int(created))
    parsed: ParsedRecord | None = None
    try:
        parsed = parse_record(
            record,
            record_format=cfg.record_format,
            input_filter=cfg.input_filter,
            max_payload_bytes=cfg.max_payload_mb * 1_000_000,
        )
        outcome = await target.run(parsed, ids, cfg.parameters)
        line = success_line(cfg, parsed, outcome, ids)
        return RecordResult(line, None, True, outcome.prompt_tokens, outcome.generated_tokens)
    except RecordFailure as failure:
        return RecordResult(*failure_lines(cfg, record, None, failure.error, ids), ok=False)
    except TwinserveError as exc:
        if is_fatal(exc):
            raise
        return RecordResult(*failure_lines(cfg, record, parsed, exc, ids), ok=False)
    except Exception as exc:  # a bug: this record fails with a stable message, the log has why
        log.exception("record %d of %s failed", record.index, file)
        error = ServerError(f"internal error while transforming the record ({type(exc).__name__})")
        return RecordResult(*failure_lines(cfg, record, parsed, error, ids), ok=False)


class FileWriter:
    """One input file's `.out`/`.err`: writes answers in input order, tracks what is committed."""

    def __init__(self, name: str, folder: Path, checkpoint: FileCheckpoint) -> None:
        self.name = name
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        self.progress = checkpoint.model_copy()
        self._out: IO[bytes] = open_at(self.out_path, checkpoint.out_offset)
        self._err: IO[bytes] = open_at(self.err_path, checkpoint.err_offset)
        self._pending: dict[int, RecordResult] = {}
        self._ends: dict[int, tuple[int, int]] = {}  # record → (input offset, line) after it
        self.dispatched = checkpoint.records
        self.read_all = False

    def dispatch(self, index: int, end_offset: int, end_line: int) -> None:
        self._ends[index] = (end_offset, end_line)
        self.dispatched = index + 1

    def put(self, index: int, done: RecordResult) -> int:
        """Buffer a finished record; write every record now in order. Returns how many."""
        self._pending[index] = done
        written = 0
        p = self.progress
        while p.records in self._pending:
            item = self._pending.pop(p.records)
            if item.out is not None:
                self._out.write(item.out)
            if item.err is not None:
                self._err.write(item.err)
            p.succeeded += item.ok
            p.failed += not item.ok
            p.prompt_tokens += item.prompt_tokens
            p.generated_tokens += item.generated_tokens
            p.input_offset, p.input_line = self._ends.pop(p.records)
            p.records += 1
            written += 1
        return written

    @property
    def finished(self) -> bool:
        return self.read_all and self.progress.records == self.dispatched

    def sync(self) -> FileCheckpoint:
        """Flush and fsync both files; the checkpoint of what is now on disk."""
        for f in (self._out, self._err):
            f.flush()
            os.fsync(f.fileno())
        self.progress.out_offset = self._out.tell()
        self.progress.err_offset = self._err.tell()
        return self.progress.model_copy()

    def close(self) -> None:
        self._out.close()
        self._err.close()
        if self.progress.done and self.progress.err_offset == 0:
            self.err_path.unlink(missing_ok=True)  # no failures: no `.err`, as SageMaker


class TransformRunner:
    """One run of a job over its inputs (a fresh start or a resume from the checkpoint).

    `_feed` dispatches the records; a platform that runs them elsewhere (Ray Data) overrides it,
    with no `target` here, and hands results to `_record_done`.
    """

    def __init__(
        self,
        job: JobDir,
        record: JobRecord,
        inputs: list[InputFile],
        target: Target | None,
        *,
        close_target: bool = True,
    ) -> None:
        self.job, self.record, self.inputs, self.target = job, record, inputs, target
        self.close_target = close_target
        self.cfg: TransformJobConfig = record.config
        self.state: TransformJob = record.state
        self.checkpoint: Checkpoint = job.load_checkpoint()
        self.folder = output_dir(self.cfg, job)
        self.writers: dict[str, FileWriter] = {}
        self.fatal: TwinserveError | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._base_seconds = self.state.transform_seconds
        self._started = time.monotonic()

    async def run(self) -> JobStatus:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signal.SIGTERM, self.stop)
        ticker = asyncio.create_task(self._tick())
        try:
            await self._feed()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            ticker.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.commit()
            for writer in self.writers.values():
                writer.close()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)
            if self.close_target and self.target is not None:
                await self.target.close()
        if self.fatal is not None:
            raise self.fatal
        if self._stopping:
            return JobStatus.STOPPED
        publish(self.cfg, [p for f in self.inputs for p in self._answer_files(f.name)])
        return JobStatus.COMPLETED_WITH_ERRORS if self.state.records_failed else JobStatus.COMPLETED

    def _answer_files(self, name: str) -> list[Path]:
        return [self.folder / f"{name}.out", self.folder / f"{name}.err"]

    def stop(self) -> None:
        """Stop dispatching, abort what is in flight; committed answers stay (resumable)."""
        if not self._stopping:
            log.info("stopping", extra={"job": self.job.name})
            if self.fatal is None:
                self.state.status = JobStatus.STOPPING  # what describe shows until it has stopped
        self._stopping = True
        for task in self._tasks:
            task.cancel()

    async def _feed(self) -> None:
        semaphore = asyncio.Semaphore(self.cfg.max_concurrent_transforms)
        for source in self.inputs:
            checkpoint = self.checkpoint.files.setdefault(source.name, FileCheckpoint())
            if checkpoint.done:
                continue
            writer = FileWriter(source.name, self.folder, checkpoint)
            self.writers[source.name] = writer
            records = iter_records(
                source.path,
                split_type=self.cfg.split_type,
                offset=checkpoint.input_offset,
                index=checkpoint.records,
                line=checkpoint.input_line,
            )
            for record, end_offset, end_line in records:
                await semaphore.acquire()
                if self._stopping:
                    semaphore.release()
                    return
                writer.dispatch(record.index, end_offset, end_line)
                task = asyncio.create_task(self._one(writer, source.name, record))
                self._tasks.add(task)
                task.add_done_callback(lambda t: self._release(t, semaphore))
            writer.read_all = True
            self._finish_if_done(writer)

    def _release(self, task: asyncio.Task[None], semaphore: asyncio.Semaphore) -> None:
        self._tasks.discard(task)
        semaphore.release()

    async def _one(self, writer: FileWriter, file: str, record: InputRecord) -> None:
        assert self.target is not None
        try:
            done = await transform_record(self.cfg, self.target, file, record, self.state.creation_time)
        except TwinserveError as exc:  # fatal (transform_record returns every other failure)
            self.fatal = self.fatal or exc
            self.stop()
            return
        self._record_done(writer, record.index, done)

    def _record_done(self, writer: FileWriter, index: int, done: RecordResult) -> None:
        """Hand a finished record to its file's writer; commit when enough are written."""
        self._since_commit += writer.put(index, done)
        if self._since_commit >= self.cfg.checkpoint_every_records:
            self.commit()
        self._finish_if_done(writer)

    def _finish_if_done(self, writer: FileWriter) -> None:
        if writer.finished and not writer.progress.done:
            writer.progress.done = True
            self.commit()

    def commit(self) -> None:
        """fsync the answers, then checkpoint them, then refresh job.json."""
        for name, writer in list(self.writers.items()):
            self.checkpoint.files[name] = writer.sync()
            if writer.progress.done:
                writer.close()
                del self.writers[name]
        self.job.save_checkpoint(self.checkpoint)
        files = self.checkpoint.files
        state = self.state
        state.records_succeeded = sum(f.succeeded for f in files.values())
        state.records_failed = sum(f.failed for f in files.values())
        state.prompt_tokens = sum(f.prompt_tokens for f in files.values())
        state.generated_tokens = sum(f.generated_tokens for f in files.values())
        state.transform_seconds = self._base_seconds + time.monotonic() - self._started
        state.files = {
            name: FileProgress.model_validate(f.model_dump(include=_PROGRESS)) for name, f in files.items()
        }
        self.job.save(self.record)
        self._since_commit = 0
        self._last_commit = time.monotonic()

    async def _tick(self) -> None:
        """Commit on time, and notice `batch stop` (a file, so any process can ask)."""
        while True:
            await asyncio.sleep(0.25)
            if self.job.stop_path.exists():
                self.stop()
            if self._since_commit and time.monotonic() - self._last_commit >= self.cfg.checkpoint_every_s:
                self.commit()


# ------------------------------------------------------------------ running
def run_job(name: str, *, target: Target | None = None, home: Path | None = None) -> TransformJob:
    """Run (or resume) job `name` to its end in this process; returns its final state.

    Holds the job's lock throughout, so two processes never run one job. A `target` given by
    the caller (tests, benchmarks: one engine for several jobs) is left open.
    """
    job = JobDir(name, home)
    with job.lock(), _job_log(job):
        record = job.load()
        state = record.state
        if state.status in (JobStatus.COMPLETED, JobStatus.COMPLETED_WITH_ERRORS):
            return state
        job.stop_path.unlink(missing_ok=True)
        state.status, state.pid, state.failure_reason, state.end_time = (
            JobStatus.IN_PROGRESS,
            os.getpid(),
            None,
            None,
        )
        state.start_time = state.start_time or time.time()
        state.runs += 1
        job.save(record)
        log.info("job started", extra={"job": name, "run": state.runs})
        try:
            inputs = list_inputs(record.config, job)
            if state.records_total is None:
                state.records_total = sum(count_records(f.path, record.config.split_type) for f in inputs)
                job.save(record)
            runner: TransformRunner
            if record.config.platform == "ray" and target is None:
                from twinserve.platforms.ray.batch import RayDataRunner

                runner = RayDataRunner(job, record, inputs)
            else:
                runner = TransformRunner(
                    job, record, inputs, target or build_target(record.config), close_target=target is None
                )
            state.status = asyncio.run(runner.run())
        except TwinserveError as exc:
            state.status, state.failure_reason = JobStatus.FAILED, exc.message
        except Exception as exc:
            log.exception("job failed")
            state.status, state.failure_reason = JobStatus.FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            state.end_time, state.pid = time.time(), None
            job.save(record)
            log.info("job ended", extra={"job": name, "status": state.status.value})
        return state


@contextlib.contextmanager
def _job_log(job: JobDir) -> Iterator[None]:
    handler = logging.FileHandler(job.log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("twinserve")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def build_target(cfg: TransformJobConfig) -> Target:
    """The engine (loaded here, with the model card applied) or the endpoint's transport."""
    if cfg.endpoint is not None:
        from twinserve.jobs.batch_endpoint import EndpointTarget, endpoint_transport

        return EndpointTarget(endpoint_transport(cfg.endpoint))
    from twinserve.config import ServeConfig
    from twinserve.engine.async_engine import AsyncEngine
    from twinserve.jobs.batch_engine import EngineTarget
    from twinserve.registry.resolve import resolve_model
    from twinserve.server.service import ModelService

    assert cfg.model is not None
    resolved = resolve_model(cfg.model)
    serve = ServeConfig.model_validate(
        {
            "model": cfg.model,
            "dtype": cfg.dtype,
            "quantize": cfg.quantize,
            "num_threads": cfg.num_threads,
            # records hold up to max_client_batch_size choices each; the semaphore bounds them
            "max_concurrent_requests": max(128, cfg.max_concurrent_transforms * 16),
        }
    )
    engine_config = ModelService(serve).engine_config_for(resolved).model_copy(update={"device": cfg.device})
    engine = AsyncEngine.launch(engine_config)
    return EngineTarget(ModelService(serve, engine=engine, resolved=resolved))
