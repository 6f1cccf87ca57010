"""Operation leases: a holder is a host, a pid and its start time; the store fences the
operations a delete displaced; replica rows come before their processes; schema migrations."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.servers import dead_holder
from twinserve.deploy.lease import OperationHolder, process_start_time, this_host, utcnow
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus, ReplicaRecord
from twinserve.deploy.state import SCHEMA_VERSION, StateStore
from twinserve.errors import BusyError, ConflictError, InterruptedOperationError, NotFoundError


def _endpoint(name: str = "twin") -> Endpoint:
    return Endpoint.new(EndpointConfig.single(name, "models:/llm-twin@champion", replicas=1))


def _replica(replica_id: str = "twin-primary-1", endpoint: str = "twin") -> ReplicaRecord:
    return ReplicaRecord(
        id=replica_id, endpoint=endpoint, variant="primary", port=4000, url="http://127.0.0.1:4000"
    )


@pytest.fixture
def other_process() -> Iterator[OperationHolder]:
    """A live process that is not this one, as a lease holder."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        started = process_start_time(proc.pid)
        yield OperationHolder(
            host=this_host(), pid=proc.pid, started=started, expires_at=utcnow() + timedelta(hours=1)
        )
    finally:
        proc.kill()
        proc.wait()


def _held_by(store: StateStore, holder: OperationHolder, operation: str = "update") -> None:
    store.update_endpoint(
        "twin", lambda e: e.model_copy(update={"operation": operation, "operation_holder": holder})
    )


def test_a_holder_is_its_pid_and_start_time(other_process: OperationHolder) -> None:
    me = OperationHolder.this_process()
    assert me.alive() and me.is_this_process()
    assert other_process.alive() and not other_process.is_this_process()
    # the same pid with another start time is another process: the pid was reused
    reused = other_process.model_copy(update={"started": (other_process.started or 0) - 60})
    assert not reused.alive()
    assert not dead_holder().alive()
    # recorded before start times were kept: the pid alone decides
    assert other_process.model_copy(update={"started": None}).alive()


def test_a_holder_on_another_host_is_trusted_until_its_lease_expires() -> None:
    far = OperationHolder(
        host="elsewhere.example", pid=1, started=1.0, expires_at=utcnow() + timedelta(minutes=5)
    )
    assert far.alive() and not far.is_this_process()
    assert not far.model_copy(update={"expires_at": utcnow() - timedelta(seconds=1)}).alive()
    assert far.describe() == "pid 1 on elsewhere.example"


def test_a_live_holder_is_waited_for_and_a_dead_one_taken_over(
    tmp_path: Path, other_process: OperationHolder
) -> None:
    store = StateStore(tmp_path / "state.db")
    store.put_endpoint(_endpoint())
    _held_by(store, other_process)
    with pytest.raises(BusyError, match="busy: a running update") as busy:
        store.begin_operation("twin", "scale")
    assert not isinstance(busy.value, InterruptedOperationError)
    dead = dead_holder()
    _held_by(store, dead)
    with pytest.raises(InterruptedOperationError, match="interrupted update"):
        store.begin_operation("twin", "scale")
    taken = store.take_over("twin", dead)
    assert taken.operation == "update" and taken.operation_holder is not None
    assert taken.operation_holder.is_this_process()
    with pytest.raises(BusyError, match="taken over"):  # a second recoverer loses the race
        store.take_over("twin", dead)


def test_an_operation_a_delete_displaced_cannot_end_it(
    tmp_path: Path, other_process: OperationHolder
) -> None:
    store = StateStore(tmp_path / "state.db")
    store.put_endpoint(_endpoint())
    store.begin_operation("twin", "update", EndpointStatus.UPDATING)  # this process updates
    _held_by(store, other_process, "delete")  # ... and another process deletes meanwhile
    store.update_endpoint("twin", lambda e: e.model_copy(update={"status": EndpointStatus.DELETING}))
    with pytest.raises(ConflictError, match="taken over by a delete"):
        store.end_operation("twin", EndpointStatus.IN_SERVICE)
    with pytest.raises(ConflictError, match="being deleted"):
        store.update_endpoint("twin", lambda e: e.model_copy(update={"status": EndpointStatus.ROLLING_BACK}))
    after = store.get_endpoint("twin")
    assert after.status is EndpointStatus.DELETING and after.operation == "delete"


def test_replica_rows_need_a_live_endpoint(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    with pytest.raises(NotFoundError, match="does not exist"):
        store.put_replica(_replica())
    store.put_endpoint(_endpoint())
    existing = store.put_replica(_replica("twin-primary-1"))
    store.begin_operation("twin", "delete", EndpointStatus.DELETING, force=True)
    with pytest.raises(ConflictError, match="being deleted"):
        store.put_replica(_replica("twin-primary-2"))
    store.put_replica(existing.model_copy(update={"pid": 4242}))  # an existing row may still change
    assert store.remove_replica(existing.id)
    with pytest.raises(NotFoundError, match="removed meanwhile"):
        store.update_replica(existing.model_copy(update={"pid": 4343}))
    assert store.replicas("twin") == []


def _v1_store(path: Path, endpoint: Endpoint, pid: int) -> None:
    """A state file as twinserve wrote it before leases (schema 1: `operation_pid`)."""
    body = endpoint.to_dict(reveal_secrets=True)
    body.pop("operation_holder")
    body.update(operation="scale", operation_pid=pid, revision=1)
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE endpoints (name TEXT PRIMARY KEY, revision INTEGER NOT NULL, status TEXT NOT NULL, "
        "body TEXT NOT NULL); PRAGMA user_version = 1;"
    )
    db.execute(
        "INSERT INTO endpoints VALUES (?, 1, ?, ?)", (endpoint.name, str(endpoint.status), json.dumps(body))
    )
    db.commit()
    db.close()


def test_a_schema_1_store_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    dead = dead_holder()
    _v1_store(path, _endpoint(), dead.pid)
    store = StateStore(path)
    ep = store.get_endpoint("twin")
    assert ep.operation == "scale" and ep.operation_holder is not None
    assert (ep.operation_holder.host, ep.operation_holder.pid) == (this_host(), dead.pid)
    assert not ep.operation_holder.alive()  # its process is gone: recoverable at once
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    StateStore(path)  # opening again changes nothing
    assert store.get_endpoint("twin") == ep


def test_a_store_from_a_newer_twinserve_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateStore(path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConflictError, match="upgrade twinserve"):
        StateStore(path)
