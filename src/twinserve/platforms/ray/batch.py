"""Batch transform on Ray Data: the local job's files, order and checkpoints, with the records run
by a pool of actors, each one in-process engine.

The job's runner (this process) is the Ray driver. It reads the input records itself, with the
local job's reader (so record numbers, line numbers, offsets and blank lines are the local ones),
and hands them to the cluster as a Dataset of small blocks. `map_batches` runs the blocks on an
actor pool (`--actors`); each actor builds its engine once, as the local job does
(`build_target`), from the model reference the driver pinned (a registry version or a path: the
weights come from the registry or the disk of the actor's node, never through the driver). An
actor runs several blocks at once and every record of a block concurrently, so its engine
batches continuously, and turns each record into the bytes the local job writes for it
(`transform_record`). Blocks come back as they finish, in any order; the driver writes them with
the local `FileWriter`s (input order, `.out`/`.err`) and commits checkpoints as they arrive, which
is what `describe` shows and what `resume` continues from.

Rows, not exceptions, carry an actor's fatal error (its model failed to load, its engine died):
the job then fails with that error's own message, and a stopped or failed job resumes from its
last commit, as locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twinserve.deploy.platform_config import RaySettings
from twinserve.errors import ServerError, TwinserveError, ValidationError
from twinserve.jobs.batch_io import InputFile
from twinserve.jobs.batch_spec import JobRecord, TransformJobConfig
from twinserve.jobs.checkpoints import FileCheckpoint, JobDir
from twinserve.jobs.records import InputRecord, iter_records
from twinserve.jobs.transform import (
    FileWriter,
    RecordResult,
    Target,
    TransformRunner,
    build_target,
    transform_record,
)
from twinserve.platforms.ray.cluster import connected, replica_env, require_ray

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

# Blocks one actor runs at once: while one block's last records finish, the others keep its
# engine's batch full (`max_concurrent_transforms` caps the records in flight per actor).
CALLS_PER_ACTOR = 4
# How long a stopping job waits for Ray Data to hand back its last block before it lets go.
_CLOSE_WAIT_S = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ray_settings(cfg: TransformJobConfig) -> RaySettings:
    """The cluster connection settings of a `platform: ray` job."""
    assert cfg.ray is not None
    return RaySettings(address=cfg.ray.address)


def actor_resources(cfg: TransformJobConfig) -> tuple[float, float]:
    """(num_cpus, num_gpus) each actor reserves."""
    assert cfg.ray is not None
    cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else float(cfg.num_threads or 1)
    gpus = cfg.ray.num_gpus if cfg.ray.num_gpus is not None else (1.0 if cfg.device == "cuda" else 0.0)
    return cpus, gpus


def rows_per_block(cfg: TransformJobConfig, pending: int) -> int:
    """Records per block: enough blocks for every actor to run several at once, and small enough
    that answers (and so progress and checkpoints) come back often."""
    assert cfg.ray is not None
    most = max(1, math.ceil(cfg.max_concurrent_transforms / 2))
    return max(1, min(most, math.ceil(pending / (cfg.ray.actors * CALLS_PER_ACTOR))))


def check_cluster(cfg: TransformJobConfig) -> None:
    """What would fail a Ray job at once, answered before it is created: the `[ray]` extra
    (ValidationError), a cluster at the address (UnreachableError within seconds), a node with
    room for one actor (ValidationError: Ray Data would wait for it forever)."""
    require_ray()
    with connected(ray_settings(cfg)) as ray:
        check_room(ray, cfg)


def check_room(ray: Any, cfg: TransformJobConfig) -> None:
    cpus, gpus = actor_resources(cfg)
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    most_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    most_gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    raise ValidationError(
        f"no node of the Ray cluster has room for one actor ({cpus:g} CPU, {gpus:g} GPU); the "
        f"largest has {most_cpus:g} CPU and {most_gpus:g} GPU: lower --actor-cpus / --actor-gpus "
        "or add a node",
        param="ray",
    )


# ------------------------------------------------------------------ the actors
def _result_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("file", pa.string()),
            ("index", pa.int64()),
            ("out", pa.large_binary()),
            ("err", pa.large_binary()),
            ("ok", pa.bool_()),
            ("prompt_tokens", pa.int64()),
            ("generated_tokens", pa.int64()),
            ("fatal_type", pa.string()),
            ("fatal_message", pa.string()),
        ]
    )


class RecordTransformer:
    """The `map_batches` class: one engine per actor, loaded once; a block's records run
    concurrently on it, at most `max_concurrent_transforms` at once over all its blocks."""

    def __init__(self, config_json: str, created: float, env: dict[str, str]) -> None:
        os.environ.update(env)  # the driver's registry and cache settings: refs resolve the same
        self.cfg = TransformJobConfig.model_validate_json(config_json)
        self.created = created
        self.slots = asyncio.Semaphore(self.cfg.max_concurrent_transforms)
        self.target: Target | None = None
        self.load_error: TwinserveError | None = None
        try:
            self.target = build_target(self.cfg)
        except TwinserveError as exc:  # every block reports it: the job fails with the loader's words
            self.load_error = exc
        except Exception as exc:  # in the words a local job fails with (`run_job`)
            log.exception("the actor could not load %s", self.cfg.model)
            self.load_error = ServerError(f"{type(exc).__name__}: {exc}")

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        rows = batch.to_pylist()
        results = await asyncio.gather(*(self._one(row) for row in rows))
        return pa.Table.from_pylist(results, schema=_result_schema())

    async def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {"file": row["file"], "index": row["index"]}
        if self.load_error is not None:
            return {
                **result,
                "fatal_type": type(self.load_error).__name__,
                "fatal_message": self.load_error.message,
            }
        assert self.target is not None
        record = InputRecord(row["index"], row["line"], row["raw"])
        async with self.slots:
            try:
                done = await transform_record(self.cfg, self.target, row["file"], record, self.created)
            except TwinserveError as exc:  # fatal: no record can succeed on this engine any more
                return {**result, "fatal_type": type(exc).__name__, "fatal_message": exc.message}
        return {
            **result,
            "out": done.out,
            "err": done.err,
            "ok": done.ok,
            "prompt_tokens": done.prompt_tokens,
            "generated_tokens": done.generated_tokens,
        }


def error_named(name: str, message: str) -> TwinserveError:
    """An actor's error again, from its class name (it crosses Ray as a row)."""
    classes: list[type[TwinserveError]] = [TwinserveError]
    while classes:
        cls = classes.pop()
        if cls.__name__ == name:
            with contextlib.suppress(TypeError):  # one that takes more than a message
                return cls(message)
            break
        classes.extend(cls.__subclasses__())
    return ServerError(message)


def ray_failure(exc: BaseException) -> ServerError:
    """What Ray Data raised (an actor or node lost for good), in one line."""
    text = _ANSI.sub("", str(exc)).strip()
    first = text.splitlines()[0][:300] if text else ""
    return ServerError(f"Ray Data stopped ({type(exc).__name__}: {first})")


# ------------------------------------------------------------------ the driver
_END = object()
_WAKE = object()


class _Results:
    """Ray Data's output blocks as they finish, read on a thread and handed to the event loop."""

    def __init__(self, dataset: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._read, args=(dataset,), name="twinserve-ray-data", daemon=True
        )
        self._thread.start()

    def _read(self, dataset: Any) -> None:
        last: Any = _END
        try:
            for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                if self._closing.is_set():
                    break  # leaving the loop closes the iterator: Ray Data shuts the actor pool down
                self._hand(table)
        except Exception as exc:
            last = exc
        self._hand(last)

    def _hand(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the job has ended
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def wake(self) -> None:
        """Let `next` return early (the job is stopping); call on the event loop."""
        self._queue.put_nowait(_WAKE)

    async def next(self) -> pa.Table | None:
        """The next finished block; None at the end or on `wake`; raises what Ray Data raised."""
        item = await self._queue.get()
        if item is _END or item is _WAKE:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self._closing.set()
        await asyncio.to_thread(self._thread.join, _CLOSE_WAIT_S)


@dataclass
class _Pending:
    """An input file's records on their way: the checkpoint they start from and where each ends."""

    checkpoint: FileCheckpoint
    ends: list[tuple[int, int, int]] = field(default_factory=list)  # (record, input offset, line)


class RayDataRunner(TransformRunner):
    """One run of a `platform: ray` job: records read here, run by the actor pool, written here."""

    def __init__(self, job: JobDir, record: JobRecord, inputs: list[InputFile]) -> None:
        super().__init__(job, record, inputs, None, close_target=False)
        self._pending: dict[str, _Pending] = {}
        self._results: _Results | None = None
        self._sent = self._received = 0

    def stop(self) -> None:
        super().stop()
        if self._results is not None:
            self._results.wake()

    async def _feed(self) -> None:
        blocks = self._read_inputs()
        if not blocks:
            return
        with connected(ray_settings(self.cfg)) as ray:
            # ray.init replaces the SIGTERM handler with its own (exit at once): take it back, so
            # a SIGTERM stops the job as it stops a local one (committed, resumable)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.stop)
            check_room(ray, self.cfg)
            self._results = _Results(self._dataset(ray, blocks), asyncio.get_running_loop())
            del blocks  # in the object store now
            try:
                while not self._stopping:
                    table = await self._results.next()
                    if table is None:
                        break
                    self._take(table)
            except Exception as exc:
                log.exception("Ray Data failed")
                self.fatal = self.fatal or ray_failure(exc)
                self.stop()
            finally:
                await self._results.close()
        if not self._stopping and self._received != self._sent:
            self.fatal = ServerError(f"Ray Data returned {self._received} of {self._sent} records")

    def _read_inputs(self) -> list[pa.Table]:
        """Every record not yet committed, in blocks (read as the local job reads them)."""
        import pyarrow as pa

        rows: list[tuple[str, InputRecord]] = []
        for source in self.inputs:
            checkpoint = self.checkpoint.files.setdefault(source.name, FileCheckpoint())
            if checkpoint.done:
                continue
            pending = self._pending[source.name] = _Pending(checkpoint)
            records = iter_records(
                source.path,
                split_type=self.cfg.split_type,
                offset=checkpoint.input_offset,
                index=checkpoint.records,
                line=checkpoint.input_line,
            )
            for record, end_offset, end_line in records:
                rows.append((source.name, record))
                pending.ends.append((record.index, end_offset, end_line))
            if not pending.ends:
                self._writer(source.name)  # nothing left to run: done now, as locally
        self._sent = len(rows)
        size = rows_per_block(self.cfg, len(rows))
        schema = pa.schema(
            [("file", pa.string()), ("index", pa.int64()), ("line", pa.int64()), ("raw", pa.large_binary())]
        )
        return [
            pa.Table.from_pydict(
                {
                    "file": [name for name, _ in chunk],
                    "index": [r.index for _, r in chunk],
                    "line": [r.line for _, r in chunk],
                    "raw": [r.raw for _, r in chunk],
                },
                schema=schema,
            )
            for chunk in (rows[i : i + size] for i in range(0, len(rows), size))
        ]

    def _dataset(self, ray: Any, blocks: list[pa.Table]) -> Any:
        from ray.data import ActorPoolStrategy, DataContext

        from twinserve.deploy.pinning import pin_model

        assert self.cfg.ray is not None and self.cfg.model is not None
        DataContext.get_current().enable_progress_bars = False  # the job has its own progress
        cpus, gpus = actor_resources(self.cfg)
        # every actor loads the same version, even if an alias moves while the job runs
        model = pin_model(self.cfg.model).load_ref
        actor_cfg = self.cfg.model_copy(
            update={"model": model, "num_threads": self.cfg.num_threads or max(1, math.ceil(cpus))}
        )
        log.info(
            "running %d records (%d blocks) on Ray Data: %d actors (%g CPU, %g GPU each) loading %s",
            self._sent,
            len(blocks),
            self.cfg.ray.actors,
            cpus,
            gpus,
            model,
            extra={"job": self.job.name},
        )
        resources: dict[str, float] = {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}
        return ray.data.from_arrow(blocks).map_batches(
            RecordTransformer,
            batch_size=blocks[0].num_rows,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(
                size=self.cfg.ray.actors,
                max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                max_tasks_in_flight_per_actor=2 * CALLS_PER_ACTOR,
            ),
            fn_constructor_kwargs={
                "config_json": actor_cfg.model_dump_json(),
                "created": self.state.creation_time,
                "env": replica_env(),
            },
            **resources,
        )

    def _take(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            if row["fatal_type"] is not None:
                self.fatal = self.fatal or error_named(row["fatal_type"], row["fatal_message"])
                self.stop()
                return
            done = RecordResult(
                row["out"], row["err"], row["ok"], row["prompt_tokens"], row["generated_tokens"]
            )
            self._received += 1
            self._record_done(self._writer(row["file"]), row["index"], done)

    def _writer(self, name: str) -> FileWriter:
        """The file's writer, opened at its first answer (a folder of many files keeps few open)."""
        writer = self.writers.get(name)
        if writer is None:
            pending = self._pending.pop(name)
            writer = self.writers[name] = FileWriter(name, self.folder, pending.checkpoint)
            for index, end_offset, end_line in pending.ends:
                writer.dispatch(index, end_offset, end_line)
            writer.read_all = True
            self._finish_if_done(writer)
        return writer
