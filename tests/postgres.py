"""A real PostgreSQL server for tests: a throwaway cluster on 127.0.0.1, stopped at the end.

Uses Debian's `postgresql` binaries (`.ci/run` installs them). PostgreSQL refuses to run
as root, so under root the cluster is owned by and run as the `postgres` system user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.needs import missing_tool
from twinserve.server.process import free_port


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def postgres_available() -> bool:
    return all(postgres_bin(name) is not None for name in ("initdb", "pg_ctl", "createdb"))


def require_postgres() -> None:
    """Skip the test where PostgreSQL is missing; fail it in CI (see tests/needs.py)."""
    if not postgres_available():
        missing_tool("PostgreSQL binaries (initdb, pg_ctl, createdb) not found")


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextlib.contextmanager
def postgres_server(database: str = "registry") -> Iterator[str]:
    """Yield a SQLAlchemy URL (`postgresql://…@127.0.0.1:PORT/database`) to a fresh cluster.

    Skips the calling test where PostgreSQL is missing, fails it under CI=true."""
    require_postgres()
    initdb, pg_ctl, createdb = postgres_bin("initdb"), postgres_bin("pg_ctl"), postgres_bin("createdb")
    assert initdb and pg_ctl and createdb, "PostgreSQL binaries not found"
    root = Path(tempfile.mkdtemp(prefix="twinserve-pg-"))
    data = root / "data"
    port = free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        root.chmod(0o700)
    run = lambda cmd: subprocess.run(_as_owner(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run([initdb, "-D", str(data), "-U", "twinserve", "--auth=trust", "--no-sync", "-E", "UTF8"])
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start"])
        try:
            run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "twinserve", database])
            yield f"postgresql://twinserve@127.0.0.1:{port}/{database}"
        finally:
            run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
