"""SQLite connections and write transactions the way every twinserve store needs them.

One connection per operation (nothing shared between threads, nothing inherited by a fork),
autocommit mode so transactions are explicit, and `BEGIN IMMEDIATE` for writes: the write lock
is taken at the first statement, so two processes never both read-then-write the same rows.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal


@contextlib.contextmanager
def connect(
    path: Path, busy_timeout_s: float, *, synchronous: Literal["NORMAL", "FULL"], wal: bool = False
) -> Iterator[sqlite3.Connection]:
    """A connection with the busy timeout and durability asked for; closed after the block."""
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        if wal:
            db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any exception (Ctrl-C included)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    if db.in_transaction:
        db.execute("COMMIT")
