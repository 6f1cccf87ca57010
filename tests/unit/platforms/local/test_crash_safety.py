"""What a control process killed at any point leaves behind, healed without a human (real
processes, tiny model): orphans swept, a replica record its starter never finished replaced, a
start that never became healthy stopped at its deadline, a dead holder's operation taken over
at once, and a delete that refuses the replicas an operation it displaced would still start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import dead_holder, until
from twinserve.deploy.lease import utcnow
from twinserve.deploy.spec import (
    Endpoint,
    EndpointConfig,
    EndpointStatus,
    ReplicaRecord,
    ReplicaState,
    ScalingEvent,
)
from twinserve.errors import ConflictError, PortTakenError
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.ports import port_of
from twinserve.platforms.local.processes import running
from twinserve.server.process import free_port


def _config(model: Path) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": "twin",
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [
                {"model": str(model), "replicas": 1, "dtype": "float32", "device": "cpu", "threads": 1}
            ],
        }
    )


def _record(replica_id: str, port: int, **fields: Any) -> ReplicaRecord:
    """A row of endpoint "twin" written by hand, as a starter killed at some point left it."""
    return ReplicaRecord(
        id=replica_id, endpoint="twin", variant="primary", port=port, url=f"http://127.0.0.1:{port}", **fields
    )


def _answers(url: str) -> bool:
    """A short generation through the endpoint's URL succeeds."""
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    return httpx.post(f"{url}/generate", json=body, timeout=60).status_code == 200


def _exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _never_healthy(manager: LocalPlatform, port: int) -> subprocess.Popen[bytes]:
    """A process whose command line reads like a replica's (`twinserve serve --port N`) that never
    answers /health: a model load that hangs."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "twinserve", "serve", "--port", str(port)],
        start_new_session=True,
    )


def test_reconcile_heals_what_killed_starters_left(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir)
    endpoint = manager.create(config, controller=False)
    serving = endpoint.replicas[0]
    # 1. a replica process whose record was never written (its starter died in between)
    orphan = manager.runtime.start_replica(config, config.variants[0])
    manager.store.remove_replica(orphan.id)
    # 2. a record whose process was never started (its starter died right after writing it)
    manager.store.put_replica(_record("twin-primary-nopid", free_port()))
    # 3. a start that hangs past its deadline, its starter gone (nobody would ever stop it)
    port = free_port()
    hung = _never_healthy(manager, port)
    manager.store.put_replica(
        _record("twin-primary-hung", port, pid=hung.pid, start_deadline=utcnow() - timedelta(seconds=1))
    )
    # 4. the record of an old generation's replica whose process is gone (an update whose CLI was
    #    killed while the commit stopped the old replicas)
    manager.store.put_replica(_record("twin-primary-oldgen", free_port(), pid=_exited_pid(), generation=2))
    # 5. a replica an interrupted scale-in had marked draining, its process still running
    drained = manager.runtime.start_replica(config, config.variants[0])
    manager.store.put_replica(drained.model_copy(update={"state": ReplicaState.DRAINING}))
    try:
        assert manager.runtime.find_orphans("twin") == [orphan.pid]
        actions = manager.reconcile("twin")
        assert any("without a record" in a and str(orphan.pid) in a for a in actions), actions
        assert any("twin-primary-nopid died" in a for a in actions), actions
        assert any("twin-primary-hung was not healthy by its start deadline" in a for a in actions), actions
        assert any(f"{drained.id} was left draining" in a for a in actions), actions
        assert any("retiring 1 replica(s) of an old generation" in a for a in actions), actions
        assert drained.pid and not running(drained.pid)
        assert orphan.pid and not running(orphan.pid)
        assert hung.wait(30) is not None
        after = manager.describe("twin")
        assert [r.id for r in after.replicas] == [serving.id] and running(serving.pid or 0)
        assert after.status is EndpointStatus.IN_SERVICE and after.operation is None
        assert manager.reconcile("twin") == []  # healed: the next pass finds nothing to do
    finally:
        hung.kill()
        hung.wait()


def test_an_operation_whose_holder_died_is_taken_over_at_once(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    manager.create(_config(tiny_model_dir), controller=False)
    holder = dead_holder()
    manager.store.update_endpoint(
        "twin",
        lambda e: e.model_copy(
            update={"operation": "scale", "operation_holder": holder, "status": EndpointStatus.UPDATING}
        ),
    )
    # the controller's path waits for no one (wait_s=0): before leases it got BusyError here
    event = ScalingEvent(endpoint="twin", variant="primary", from_replicas=1, to_replicas=1, reason="test")
    scaled = manager.scale("twin", 1, event=event)
    assert scaled.status is EndpointStatus.IN_SERVICE and scaled.operation is None
    assert [e.reason for e in manager.events("twin")] == ["test"]


def test_a_deleting_endpoint_starts_no_replica(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir)
    manager.create(config, controller=False)
    # a delete has taken the endpoint; an update it displaced tries to start its green replica
    manager.store.begin_operation("twin", "delete", EndpointStatus.DELETING, force=True)
    with pytest.raises(ConflictError, match="being deleted"):
        manager.runtime.start_replica(config, config.variants[0], generation=2)
    assert manager.runtime.find_orphans("twin") == []  # refused before any process started
    assert manager.delete("twin")


def test_the_router_and_the_controller_restart_each_other(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir))  # with its controller
    url, first = endpoint.url, manager.store.get_endpoint("twin")
    assert url and first.controller_pid and first.router_pid

    def restarted(field: str, old: int) -> bool:
        ep = manager.store.get_endpoint("twin")
        alive = manager.controller_alive(ep) if field == "controller_pid" else manager.router_alive(ep)
        return getattr(ep, field) not in (None, old) and alive

    os.kill(first.controller_pid, signal.SIGKILL)  # the router notices and starts a new one
    assert until(lambda: restarted("controller_pid", first.controller_pid or 0), 60)
    os.kill(first.router_pid, signal.SIGKILL)  # the new controller notices and restarts it
    assert until(lambda: restarted("router_pid", first.router_pid or 0), 60)
    healed = manager.store.get_endpoint("twin")
    assert healed.url == url  # on the same port
    assert _answers(url)


def test_a_router_that_cannot_have_its_port_back_fails_the_endpoint(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir), controller=False)
    assert endpoint.url and endpoint.router_pid
    os.kill(endpoint.router_pid, signal.SIGKILL)
    assert until(lambda: manager.router.exited("twin") is not None, 10)  # reaped: its port is free
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port_of(endpoint.url) or 0))
    squatter.listen()
    try:
        with pytest.raises(PortTakenError, match="would change the endpoint's URL"):
            manager.reconcile("twin")
    finally:
        squatter.close()
    after = manager.store.get_endpoint("twin")
    assert after.status is EndpointStatus.FAILED and after.url == endpoint.url  # never moved
    assert after.failure_reason and "is held by another process" in after.failure_reason


def test_a_create_whose_creator_died_is_finished_by_its_controller(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    # the CLI wrote the endpoint and started its controller, then was killed before any replica
    creating = Endpoint.new(_config(tiny_model_dir)).model_copy(
        update={"operation": "create", "operation_holder": dead_holder()}
    )
    manager.store.put_endpoint(creating)
    manager.start_controller("twin")
    assert until(lambda: manager.store.get_endpoint("twin").status is EndpointStatus.IN_SERVICE, 120)
    ep = manager.describe("twin")
    assert ep.operation is None and ep.url and manager.router_alive(ep)
    assert [r.state.serves for r in ep.replicas] == [True]
    assert _answers(ep.url)


def test_a_delete_whose_caller_died_is_finished_by_the_controller(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir))  # with its controller
    pids = [r.pid for r in endpoint.replicas] + [endpoint.router_pid, endpoint.controller_pid]
    # a delete took the endpoint and its process was killed before it stopped anything
    manager.store.update_endpoint(
        "twin",
        lambda e: e.model_copy(
            update={
                "operation": "delete",
                "operation_holder": dead_holder(),
                "status": EndpointStatus.DELETING,
            }
        ),
    )
    assert until(lambda: manager.store.list_endpoints() == [], 60)
    assert until(lambda: not any(running(pid or 0) for pid in pids), 30), pids


def test_a_replica_killed_while_it_loads_is_started_again(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    config = _config(tiny_model_dir)
    manager.store.put_endpoint(Endpoint.new(config))
    started: list[ReplicaRecord] = []
    starter = threading.Thread(
        target=lambda: started.append(manager.runtime.start_replica(config, config.variants[0]))
    )
    starter.start()

    def loading() -> list[ReplicaRecord]:
        return [r for r in manager.store.replicas("twin") if r.pid and r.state is ReplicaState.STARTING]

    assert until(lambda: bool(loading()), 30)
    first = loading()[0]
    os.kill(first.pid or 0, signal.SIGKILL)  # e.g. the OOM killer: not the control plane's doing
    starter.join(120)
    assert started and started[0].id != first.id and started[0].state.serves
    assert [r.id for r in manager.store.replicas("twin")] == [started[0].id]
