"""The endpoints' state store: one SQLite file, `TWINSERVE_HOME/endpoints/state.db`.

Several processes share it (the CLI that creates an endpoint, a later `describe`, the
router's control loop), so every write is one transaction: `BEGIN IMMEDIATE` takes the write
lock up front (no read-then-upgrade deadlock), WAL lets readers go on meanwhile, and a busy
timeout makes a second writer wait instead of failing. Every endpoint write that can race is a
read-change-write inside one such transaction (`update_endpoint`), so no write is lost; the
desired state (config, generation, target, counts) is changed only by the process holding the
endpoint's operation; a blind write (`put_endpoint`) carries the row's `revision` and a stale
one is refused (ConflictError), so two control planes never silently overwrite each other.

Operations are leases (`OperationHolder`: host, pid, start time): a dead holder is known dead at
once, and `end_operation` refuses a process whose operation was taken over meanwhile (a delete
during an update), so the two never both decide. A replica row is written before its process
starts, and no new row is accepted for an endpoint that is gone or being deleted.

Schema (JSON bodies are the pydantic models; the extra columns are for queries); `PRAGMA
user_version` is its version, and opening an older file migrates it (`_MIGRATIONS`):
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
import sqlite3
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from twinserve import sqlite_db
from twinserve.config import get_settings
from twinserve.deploy.lease import LEASE_TTL_S, OperationHolder, this_host
from twinserve.deploy.spec import Endpoint, EndpointStatus, ReplicaRecord, ReplicaState, ScalingEvent, utcnow
from twinserve.errors import BusyError, ConflictError, InterruptedOperationError, NotFoundError

SCHEMA_VERSION = 2

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


def _leases_from_pids(db: sqlite3.Connection) -> None:
    """1 → 2: `operation_pid` becomes `operation_holder` (this host, start time unknown)."""
    expires = (utcnow() + timedelta(seconds=LEASE_TTL_S)).isoformat()
    for name, body in db.execute("SELECT name, body FROM endpoints").fetchall():
        data = json.loads(body)
        pid = data.pop("operation_pid", None)
        if pid is not None:
            data["operation_holder"] = {
                "host": this_host(),
                "pid": pid,
                "started": None,
                "expires_at": expires,
            }
        db.execute("UPDATE endpoints SET body = ? WHERE name = ?", (json.dumps(data), name))


# _MIGRATIONS[v] brings a store from version v to v + 1 (0: a new file, its tables just created)
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: lambda db: None, 1: _leases_from_pids}


def _desired_state(ep: Endpoint) -> tuple[object, ...]:
    """What an endpoint should run, as opposed to what was observed of it."""
    counts = [(v.name, v.desired_replicas) for v in ep.variants]
    return (ep.config, ep.generation, ep.target, ep.target_share, counts)


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
        with self._tx() as db:  # one process migrates; the others then find it done
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConflictError(
                    f"{self.path} has schema version {version}, newer than this twinserve's "
                    f"{SCHEMA_VERSION}: upgrade twinserve"
                )
            for v in range(version, SCHEMA_VERSION):
                _MIGRATIONS[v](db)
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
        """Read, change and write in one transaction: no other writer in between, no lost update.

        Two kinds of change are the operation holder's alone (ConflictError for anyone else, e.g.
        a process whose operation a delete or a recovery took over meanwhile):
        - any change to a Deleting endpoint: an operation the delete displaced must neither
          revive it nor record a process it started (it stops that process instead);
        - the desired state: config, generation, update target and traffic share, desired counts.
        Everything else (a router's URL, a probed state) is observed, and any process may write it."""
        with self._tx() as db:
            current = self._read(db, name)
            changed = change(current)
            holds = any(
                h is not None and h.is_this_process()
                for h in (current.operation_holder, changed.operation_holder)
            )
            if current.status is EndpointStatus.DELETING and not holds:
                raise ConflictError(f"endpoint {name!r} is being deleted")
            if not holds and _desired_state(changed) != _desired_state(current):
                who = current.operation_holder.describe() if current.operation_holder else "no one"
                raise ConflictError(
                    f"endpoint {name!r}: only the operation holding it changes what it should run "
                    f"(held by {who}); begin an operation first"
                )
            return self._write(db, changed, check_revision=False)

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

        One operation at a time: BusyError while a live process holds it (wait for it),
        InterruptedOperationError when its holder died (recover it, e.g. `reconcile`, then take
        it). `allowed` may refuse with a reason (e.g. the status does not permit an update);
        `force` (delete) takes it anyway: the holder it displaces can no longer end it.
        """

        def change(ep: Endpoint) -> Endpoint:
            if not force:
                if ep.operation is not None:
                    holder = ep.operation_holder
                    who = holder.describe() if holder is not None else "no holder"
                    if holder is not None and holder.alive():
                        raise BusyError(
                            f"endpoint {name!r} is busy: a running {ep.operation} ({who}); wait for it"
                        )
                    raise InterruptedOperationError(
                        f"endpoint {name!r} is held by an interrupted {ep.operation} ({who} is gone); "
                        "`twinserve endpoint reconcile` recovers it"
                    )
                refusal = allowed(ep) if allowed is not None else None
                if refusal is not None:
                    raise ConflictError(f"endpoint {name!r} cannot {operation}: {refusal}")
            update: dict[str, object] = {
                "operation": operation,
                "operation_holder": OperationHolder.this_process(),
            }
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
        """Release the endpoint with `status`; a reason sets `failure_reason`, `clear_failure` drops it.

        ConflictError when another live process took the endpoint over meanwhile (a delete
        during this process's update): its decision stands, this one's is dropped."""

        def change(ep: Endpoint) -> Endpoint:
            holder = ep.operation_holder
            if holder is not None and not holder.is_this_process() and holder.alive():
                raise ConflictError(
                    f"endpoint {name!r} was taken over by a {ep.operation} ({holder.describe()}) meanwhile"
                )
            failure = reason if reason is not None else (None if clear_failure else ep.failure_reason)
            update = {
                "status": status,
                "failure_reason": failure,
                "operation": None,
                "operation_holder": None,
            }
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

    def take_over(self, name: str, dead: OperationHolder | None) -> Endpoint:
        """Hold the interrupted operation of `dead` (kept by name) to recover it; BusyError if
        someone else took it first (compare-and-set on the holder)."""

        def change(ep: Endpoint) -> Endpoint:
            if ep.operation is None or ep.operation_holder != dead:
                raise BusyError(
                    f"endpoint {name!r}: the interrupted {ep.operation or 'operation'} was taken over"
                )
            return ep.model_copy(update={"operation_holder": OperationHolder.this_process()})

        return self.update_endpoint(name, change)

    def put_replica(self, record: ReplicaRecord) -> ReplicaRecord:
        """Insert or update a replica row. A new row needs its endpoint, not being deleted: it is
        written before the replica's process starts, so a refused row starts no process."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM endpoints WHERE name = ?", (record.endpoint,)).fetchone()
            if row is None:
                raise NotFoundError(f"endpoint {record.endpoint!r} does not exist (deleted meanwhile?)")
            exists = db.execute("SELECT 1 FROM replicas WHERE id = ?", (record.id,)).fetchone()
            if exists is None and row[0] == str(EndpointStatus.DELETING):
                raise ConflictError(f"endpoint {record.endpoint!r} is being deleted: no new replica")
            db.execute(
                "INSERT INTO replicas (id, endpoint, variant, state, body) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, body = excluded.body",
                (record.id, record.endpoint, record.variant, str(record.state), record.model_dump_json()),
            )
        return record

    def update_replica(self, record: ReplicaRecord) -> ReplicaRecord:
        """Rewrite an existing row; NotFoundError if it was removed meanwhile (its endpoint deleted,
        or the replica retired): the caller stops the process it describes."""
        with self._tx() as db:
            changed = db.execute(
                "UPDATE replicas SET state = ?, body = ? WHERE id = ?",
                (str(record.state), record.model_dump_json(), record.id),
            ).rowcount
        if not changed:
            raise NotFoundError(f"replica {record.id!r} was removed meanwhile")
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
