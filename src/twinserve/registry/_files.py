"""Small filesystem helpers for building cache entries safely: a lock, an atomic write, a digest."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def file_lock(
    path: Path, on_wait: Callable[[], None] | None = None, *, required: bool = True
) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block.

    `flock` is released by the kernel when the process dies, so a crashed builder never
    leaves a stale lock behind. `on_wait` runs once if another process holds it. With
    `required=False` the block runs unlocked where the lock file can't be created (a
    read-only home): for locks that only save duplicate work, never for ones that keep
    data whole.
    """
    handle = _open_lock(path, required)
    if handle is None:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_lock(path: Path, required: bool) -> IO[str] | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a+")
    except OSError:
        if required:
            raise
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never a part.

    Written beside the target and renamed over it (`rename` is atomic within a file system),
    readable as the umask allows (mkstemp's 0600 would hide it from other users of a cache).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def make_readable(folder: Path) -> None:
    """Reset the folder's file modes to what the umask allows.

    Some writers leave 0600 temp files behind; a cache shared between users must stay readable.
    """
    umask = _umask()
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask
