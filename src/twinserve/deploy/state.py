"""The endpoints' state store: one SQLite file, `TWINSERVE_HOME/endpoints/state.db`.

Several processes share it (the CLI that creates an endpoint, a later `describe`, the
router's control loop), so every write is one transaction: `BEGIN IMMEDIATE` takes the write
lock up front (no read-then-upgrade deadlock), WAL lets readers go on meanwhile, and a busy
timeout makes a second writer wait instead of failing. Endpoint writes are optimistic as well:
each row carries a `revision`, and `put_endpoint` refuses a stale one (ConflictError), so two
control planes never silently overwrite each other's decision.

Schema (JSON bodies are the pydantic models; the extra columns are for queries):
```
endpoints(name PK, revision, status, body)            Endpoint without `replicas` (api key included)
replicas(id PK, endpoint, variant, state, body)        ReplicaRecord, owned by the runtime
scaling_events(id PK autoincrement, endpoint, time, body)   ScalingEvent
```
The api key is stored in clear (replicas started later need it), so the folder is 0700 and the
file 0600 (WAL's side files take the umask; the folder keeps them private).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from twinserve import sqlite_db
from twinserve.config import get_settings
from twinserve.deploy.spec import Endpoint, EndpointStatus, ReplicaRecord, ReplicaState, ScalingEvent, utcnow
from twinserve.errors import BusyError, ConflictError, NotFoundError
from twinserve.platforms.local.processes import running

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    variant TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS replicas_by_endpoint ON replicas (endpoint);
CREATE TABLE IF NOT EXISTS scaling_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint TEXT NOT NULL,
    time TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_endpoint ON scaling_events (endpoint, id);
"""


def default_state_path() -> Path:
    return get_settings().home / "endpoints" / "state.db"


class StateStore:
    """Endpoints, their replicas and scaling events in one SQLite file; safe across processes."""

    def __init__(self, path: Path | None = None, *, busy_timeout_s: float = 30.0) -> None:
        self.path = path or default_state_path()
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            self.path.parent.chmod(0o700)
        if not self.path.exists():
            self.path.touch(mode=0o600)
        with self._connect() as db:
            db.executescript(_SCHEMA)  # idempotent; concurrent first opens are fine
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with sqlite_db.connect(self.path, self.busy_timeout_s, synchronous="NORMAL", wal=True) as db:
            yield db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the lock from its first statement."""
        with self._connect() as db, sqlite_db.write_transaction(db):
            yield db

    # --- endpoints ---

    def put_endpoint(self, endpoint: Endpoint, *, check_revision: bool = True) -> Endpoint:
        """Store `endpoint`; returns it with the new revision and `updated_at`.

        revision 0 creates (ConflictError if the name exists); otherwise the stored revision must
        equal `endpoint.revision` (ConflictError if someone wrote in between), unless
        `check_revision` is False. `replicas` are not written here (see `put_replica`).
        """
        with self._tx() as db:
            return self._write(db, endpoint, check_revision)

    def _write(self, db: sqlite3.Connection, endpoint: Endpoint, check_revision: bool) -> Endpoint:
        row = db.execute("SELECT revision FROM endpoints WHERE name = ?", (endpoint.name,)).fetchone()
        if check_revision:
            if row is None and endpoint.revision != 0:
                raise NotFoundError(f"endpoint {endpoint.name!r} does not exist (deleted meanwhile?)")
            if row is not None and endpoint.revision == 0:
                raise ConflictError(f"endpoint {endpoint.name!r} already exists")
            if row is not None and row[0] != endpoint.revision:
                raise ConflictError(
                    f"endpoint {endpoint.name!r} changed meanwhile (revision {row[0]}, "
                    f"expected {endpoint.revision}); read it again"
                )
        revision = (row[0] if row else 0) + 1
        stored = endpoint.model_copy(update={"revision": revision, "updated_at": utcnow(), "replicas": []})
        body = json.dumps(stored.to_dict(reveal_secrets=True))
        db.execute(
            "INSERT INTO endpoints (name, revision, status, body) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET revision = excluded.revision, "
            "status = excluded.status, body = excluded.body",
            (endpoint.name, revision, str(stored.status), body),
        )
        return stored.model_copy(update={"replicas": self._replicas(db, endpoint.name)})

    def get_endpoint(self, name: str) -> Endpoint:
        """The endpoint with its replicas; NotFoundError if there is none of that name."""
        with self._connect() as db:
            return self._read(db, name)

    def _read(self, db: sqlite3.Connection, name: str) -> Endpoint:
        row = db.execute("SELECT body FROM endpoints WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no endpoint named {name!r}")
        endpoint = Endpoint.model_validate(json.loads(row[0]))
        return endpoint.model_copy(update={"replicas": self._replicas(db, name)})

    def list_endpoints(self) -> list[Endpoint]:
        with self._connect() as db:
            names = [r[0] for r in db.execute("SELECT name FROM endpoints ORDER BY name")]
            return [self._read(db, n) for n in names]

    def update_endpoint(self, name: str, change: Callable[[Endpoint], Endpoint]) -> Endpoint:
        """Read, change and write in one transaction: no other writer in between, no conflict."""
        with self._tx() as db:
            return self._write(db, change(self._read(db, name)), check_revision=False)

    def begin_operation(
        self,
        name: str,
        operation: str,
        status: EndpointStatus | None = None,
        *,
        allowed: Callable[[Endpoint], str | None] | None = None,
        force: bool = False,
    ) -> Endpoint:
        """Take the endpoint for `operation` (this process holds it) and set `status` if given.

        One operation at a time: BusyError while another holds it, whether its process lives
        (wait for it) or died (reconcile recovers it first). `allowed` may refuse with a
        reason (e.g. the status does not permit an update); `force` (delete) takes it anyway.
        """

        def change(ep: Endpoint) -> Endpoint:
            if not force:
                if ep.operation is not None:
                    holder = "running" if ep.operation_pid and running(ep.operation_pid) else "interrupted"
                    hint = (
                        "wait for it" if holder == "running" else "`twinserve endpoint reconcile` recovers it"
                    )
                    raise BusyError(
                        f"endpoint {name!r} is busy: a {holder} {ep.operation} (pid {ep.operation_pid}); {hint}"
                    )
                refusal = allowed(ep) if allowed is not None else None
                if refusal is not None:
                    raise ConflictError(f"endpoint {name!r} cannot {operation}: {refusal}")
            update: dict[str, object] = {"operation": operation, "operation_pid": os.getpid()}
            if status is not None:
                update["status"] = status
            return ep.model_copy(update=update)

        return self.update_endpoint(name, change)

    def end_operation(
        self,
        name: str,
        status: EndpointStatus,
        *,
        reason: str | None = None,
        clear_failure: bool = False,
        **changes: object,
    ) -> Endpoint:
        """Release the endpoint with `status`; a reason sets `failure_reason`, `clear_failure` drops it."""

        def change(ep: Endpoint) -> Endpoint:
            failure = reason if reason is not None else (None if clear_failure else ep.failure_reason)
            update = {"status": status, "failure_reason": failure, "operation": None, "operation_pid": None}
            return ep.model_copy(update={**update, **changes})

        return self.update_endpoint(name, change)

    def delete_endpoint(self, name: str) -> bool:
        """Forget the endpoint, its replica records and events; False if it was not there (idempotent)."""
        with self._tx() as db:
            gone = db.execute("DELETE FROM endpoints WHERE name = ?", (name,)).rowcount
            db.execute("DELETE FROM replicas WHERE endpoint = ?", (name,))
            db.execute("DELETE FROM scaling_events WHERE endpoint = ?", (name,))
            return gone > 0

    # --- replicas ---

    def put_replica(self, record: ReplicaRecord) -> ReplicaRecord:
        with self._tx() as db:
            db.execute(
                "INSERT INTO replicas (id, endpoint, variant, state, body) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, body = excluded.body",
                (record.id, record.endpoint, record.variant, str(record.state), record.model_dump_json()),
            )
        return record

    def observe_replica(self, record: ReplicaRecord, state: ReplicaState) -> ReplicaRecord | None:
        """Record a probed `state` only if the row still exists in the state the probe started
        from (compare-and-set): a slow probe never resurrects a replica that was retired
        meanwhile, nor overwrites what its owner wrote since. None if the row is gone; the
        stored record (changed or not) otherwise."""
        with self._tx() as db:
            row = db.execute("SELECT body FROM replicas WHERE id = ?", (record.id,)).fetchone()
            if row is None:
                return None
            current = ReplicaRecord.model_validate_json(row[0])
            if current.state is not record.state:
                return current  # someone else changed it after we read it: theirs wins
            updated = current.model_copy(update={"state": state})
            db.execute(
                "UPDATE replicas SET state = ?, body = ? WHERE id = ?",
                (str(state), updated.model_dump_json(), record.id),
            )
            return updated

    def get_replica(self, replica_id: str) -> ReplicaRecord:
        with self._connect() as db:
            row = db.execute("SELECT body FROM replicas WHERE id = ?", (replica_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no replica {replica_id!r}")
        return ReplicaRecord.model_validate_json(row[0])

    def replicas(self, endpoint: str) -> list[ReplicaRecord]:
        with self._connect() as db:
            return self._replicas(db, endpoint)

    @staticmethod
    def _replicas(db: sqlite3.Connection, endpoint: str) -> list[ReplicaRecord]:
        rows = db.execute("SELECT body FROM replicas WHERE endpoint = ? ORDER BY rowid", (endpoint,))
        return [ReplicaRecord.model_validate_json(r[0]) for r in rows]

    def remove_replica(self, replica_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM replicas WHERE id = ?", (replica_id,)).rowcount > 0

    # --- scaling events ---

    def record_event(self, event: ScalingEvent) -> ScalingEvent:
        with self._tx() as db:
            db.execute(
                "INSERT INTO scaling_events (endpoint, time, body) VALUES (?, ?, ?)",
                (event.endpoint, event.time.isoformat(), event.model_dump_json()),
            )
        return event

    def events(self, name: str, *, limit: int | None = None) -> list[ScalingEvent]:
        """Scaling events of an endpoint, oldest first (the last `limit` if given)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT body FROM scaling_events WHERE endpoint = ? ORDER BY id DESC LIMIT ?",
                (name, -1 if limit is None else limit),
            ).fetchall()
        return [ScalingEvent.model_validate_json(r[0]) for r in reversed(rows)]
