"""State store: CRUD, optimistic revisions, replicas and events, two processes writing at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import dead_holder
from twinserve.deploy.spec import (
    Endpoint,
    EndpointConfig,
    EndpointStatus,
    ReplicaRecord,
    ReplicaState,
    ScalingEvent,
)
from twinserve.deploy.state import StateStore
from twinserve.errors import ConflictError, NotFoundError


def _endpoint(name: str = "twin", key: str | None = "s3cret-key") -> Endpoint:
    return Endpoint.new(EndpointConfig.single(name, "models:/llm-twin@champion", replicas=2, api_key=key))


def test_crud(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    with pytest.raises(NotFoundError):
        store.get_endpoint("twin")
    stored = store.put_endpoint(_endpoint())
    assert stored.revision == 1
    got = store.get_endpoint("twin")
    assert got == stored
    # the key survives the store (replicas started later need it)
    assert got.config.api_key is not None and got.config.api_key.get_secret_value() == "s3cret-key"
    store.put_endpoint(_endpoint("alpha", key=None))
    assert [e.name for e in store.list_endpoints()] == ["alpha", "twin"]
    assert store.delete_endpoint("twin") is True
    assert store.delete_endpoint("twin") is False  # idempotent
    with pytest.raises(NotFoundError):
        store.get_endpoint("twin")
    assert (tmp_path / "state.db").stat().st_mode & 0o077 == 0


def test_default_path_is_under_twinserve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path))
    store = StateStore()
    assert store.path == tmp_path / "endpoints" / "state.db"
    assert store.path.exists()


def test_revisions_catch_lost_updates(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    with pytest.raises(ConflictError, match="already exists"):
        store.put_endpoint(store.put_endpoint(_endpoint()).model_copy(update={"revision": 0}))
    first = store.get_endpoint("twin")
    second = store.get_endpoint("twin")
    store.put_endpoint(first.model_copy(update={"status": EndpointStatus.IN_SERVICE}))
    with pytest.raises(ConflictError, match="changed meanwhile"):
        store.put_endpoint(second.model_copy(update={"status": EndpointStatus.FAILED}))
    assert store.get_endpoint("twin").status is EndpointStatus.IN_SERVICE
    store.delete_endpoint("twin")
    with pytest.raises(NotFoundError):
        store.put_endpoint(first)


def test_end_operation_sets_keeps_and_clears_the_reason(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.put_endpoint(_endpoint())
    store.begin_operation("twin", "create")
    failed = store.end_operation("twin", EndpointStatus.FAILED, reason="replica exited: bad weights")
    assert failed.status is EndpointStatus.FAILED and failed.operation is None
    assert failed.failure_reason == "replica exited: bad weights"
    assert failed.updated_at >= failed.created_at
    kept = store.end_operation("twin", EndpointStatus.IN_SERVICE)  # an earlier failure stays on record
    assert kept.failure_reason == "replica exited: bad weights"
    assert store.end_operation("twin", EndpointStatus.IN_SERVICE, clear_failure=True).failure_reason is None
    with pytest.raises(NotFoundError):
        store.end_operation("nope", EndpointStatus.FAILED)


def test_replicas_and_events(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.put_endpoint(_endpoint())
    rec = ReplicaRecord(id="twin-primary-1", endpoint="twin", variant="primary", pid=123, port=4000, url="u")
    store.put_replica(rec)
    store.put_replica(rec.model_copy(update={"state": ReplicaState.HEALTHY}))
    got = store.get_endpoint("twin")
    assert [(r.id, r.state) for r in got.replicas] == [("twin-primary-1", ReplicaState.HEALTHY)]
    # writing the endpoint does not touch the runtime's replica rows
    store.put_endpoint(got.model_copy(update={"replicas": []}))
    assert len(store.replicas("twin")) == 1
    for to in (2, 3):
        store.record_event(
            ScalingEvent(
                endpoint="twin",
                variant="primary",
                metric="concurrent_requests_per_replica",
                metric_value=7.5,
                from_replicas=to - 1,
                to_replicas=to,
                reason="7.5 > 4",
            )
        )
    assert [e.to_replicas for e in store.events("twin")] == [2, 3]
    assert [e.to_replicas for e in store.events("twin", limit=1)] == [3]
    assert store.remove_replica("twin-primary-1") and not store.remove_replica("twin-primary-1")
    store.put_replica(rec)
    store.delete_endpoint("twin")
    assert store.replicas("twin") == [] and store.events("twin") == []


_WRITER = """
import sys
from pathlib import Path
from twinserve.deploy.spec import ScalingEvent
from twinserve.deploy.state import StateStore

store = StateStore(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    def bump(ep):
        v = ep.variants[0]
        return ep.model_copy(update={"variants": [v.model_copy(update={"current_replicas": v.current_replicas + 1})]})
    store.update_endpoint("twin", bump)
    store.record_event(ScalingEvent(endpoint="twin", variant="primary", from_replicas=0, to_replicas=1,
                                    reason=sys.argv[3]))
"""


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.put_endpoint(_endpoint())
    n = 40
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n), who], env=env)
        for who in ("a", "b")
    ]
    assert [p.wait(120) for p in procs] == [0, 0]
    endpoint = store.get_endpoint("twin")
    # every read-modify-write landed: none lost to the other process
    assert endpoint.variants[0].current_replicas == 2 * n
    assert endpoint.revision == 1 + 2 * n
    reasons = [e.reason for e in store.events("twin")]
    assert reasons.count("a") == n and reasons.count("b") == n


def test_only_the_operation_holder_changes_the_desired_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.put_endpoint(_endpoint())

    def more(ep: Endpoint) -> Endpoint:
        v = ep.variants[0]
        return ep.model_copy(update={"variants": [v.model_copy(update={"desired_replicas": 5})]})

    with pytest.raises(ConflictError, match="only the operation holding it"):
        store.update_endpoint("twin", more)  # nobody holds it
    # observed fields are anyone's to write
    store.update_endpoint("twin", lambda e: e.model_copy(update={"url": "http://127.0.0.1:9"}))
    store.begin_operation("twin", "scale")
    assert store.update_endpoint("twin", more).variants[0].desired_replicas == 5
    # a holder that lost the endpoint (taken over by another process) may no longer change it
    store.update_endpoint("twin", lambda e: e.model_copy(update={"operation_holder": dead_holder()}))
    with pytest.raises(ConflictError, match="only the operation holding it"):
        store.update_endpoint("twin", lambda e: e.model_copy(update={"generation": 2}))
