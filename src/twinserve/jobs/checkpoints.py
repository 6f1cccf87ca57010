"""A batch job's state folder, `$TWINSERVE_HOME/batch/<job>/`, and what makes a job resumable.

```
job.json         the config and the latest state (what `describe` reads)
checkpoint.json  per input file: records committed, where the next one starts in the input,
                 and the sizes of `.out`/`.err` when they were committed
lock             flock'ed by the process running the job (one runner per job)
stop             asks the runner to stop (`batch stop`)
log.txt          the runner's log
output/          answers, when the job's output is s3:// (uploaded once a file is done)
```
A commit is: flush and fsync `.out` and `.err`, then write the checkpoint atomically (a
temporary file, fsync, rename, fsync of the folder). The checkpoint therefore never claims
bytes that are not on disk. A runner killed at any moment (`kill -9`, power loss) leaves at
worst answers past the checkpoint; `resume` truncates each output back to the checkpointed
size and goes on with the next record, so nothing committed is redone and no line appears
twice. With greedy decoding the re-run records give the same bytes again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pydantic import BaseModel, Field

from twinserve.config import get_settings
from twinserve.errors import BusyError, ConflictError, NotFoundError
from twinserve.jobs.batch_spec import FileProgress, JobRecord


class FileCheckpoint(FileProgress):
    """Where one input file stands at the last commit."""

    input_offset: int = Field(0, description="Byte offset in the input of the next record.")
    input_line: int = Field(1, description="Line number of the next record.")
    out_offset: int = Field(0, description="Size of `<name>.out` at the commit.")
    err_offset: int = Field(0, description="Size of `<name>.err` at the commit.")


class Checkpoint(BaseModel):
    files: dict[str, FileCheckpoint] = Field(default_factory=dict)


def batch_home() -> Path:
    return get_settings().home / "batch"


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JobDir:
    """The state folder of one job."""

    def __init__(self, name: str, home: Path | None = None) -> None:
        self.name = name
        self.path = (home or batch_home()) / name

    @property
    def job_json(self) -> Path:
        return self.path / "job.json"

    @property
    def checkpoint_json(self) -> Path:
        return self.path / "checkpoint.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    @property
    def stop_path(self) -> Path:
        return self.path / "stop"

    @property
    def staging(self) -> Path:
        """Where answers are written before upload, for an s3:// output."""
        return self.path / "output"

    def exists(self) -> bool:
        return self.job_json.exists()

    def load(self) -> JobRecord:
        try:
            return JobRecord.model_validate_json(self.job_json.read_bytes())
        except FileNotFoundError as exc:
            raise NotFoundError(f"no batch job named {self.name!r}") from exc

    def save(self, record: JobRecord) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.job_json, record.model_dump_json(indent=2).encode())

    def load_checkpoint(self) -> Checkpoint:
        if not self.checkpoint_json.exists():
            return Checkpoint()
        return Checkpoint.model_validate_json(self.checkpoint_json.read_bytes())

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        atomic_write(self.checkpoint_json, checkpoint.model_dump_json().encode())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held while a runner runs the job; BusyError when another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / "lock").open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise BusyError(f"batch job {self.name!r} is running in another process") from exc
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def is_running(self) -> bool:
        """Whether some process holds the job's lock (its runner is alive)."""
        lock = self.path / "lock"
        if not lock.exists():
            return False
        with lock.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False


def list_jobs(home: Path | None = None) -> list[JobDir]:
    root = home or batch_home()
    if not root.exists():
        return []
    return [JobDir(p.name, root) for p in sorted(root.iterdir()) if (p / "job.json").exists()]


def open_at(path: Path, offset: int) -> IO[bytes]:
    """`path` opened for appending after truncating it to `offset` (what the checkpoint holds):
    bytes written after the last commit are dropped, to be written again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("r+b" if path.exists() else "w+b")
    size = f.seek(0, os.SEEK_END)
    if size < offset:
        f.close()
        raise ConflictError(
            f"{path} is shorter ({size} bytes) than its checkpoint says ({offset}); it was changed "
            "outside the job, so the job cannot resume safely"
        )
    f.truncate(offset)
    f.seek(offset)
    return f
