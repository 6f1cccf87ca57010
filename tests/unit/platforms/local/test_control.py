"""LocalPlatform with real replica and router processes on the tiny model: create, invoke, delete."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.servers import process_gone
from twinserve.client import LLMClient
from twinserve.deploy.spec import EndpointConfig, EndpointStatus, ReplicaState
from twinserve.errors import ConflictError, NotFoundError, UnauthorizedError
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.runtime import ReplicaStartError

KEY = "k3y-for-control-tests"


def _config(model: Path, name: str, *, replicas: int = 1, api_key: str | None = None) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": name,
            "api_key": api_key,
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [
                {"model": str(model), "replicas": replicas, "dtype": "float32", "device": "cpu", "threads": 1}
            ],
        }
    )


def test_create_invoke_delete(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    messages: list[dict[str, str]] = []
    endpoint = manager.create(
        _config(tiny_model_dir, "twin", replicas=2, api_key=KEY), progress=messages.append
    )
    assert endpoint.status is EndpointStatus.IN_SERVICE
    assert any("InService" in m for m in messages)
    assert endpoint.url and endpoint.router_pid and manager.router.is_ours(endpoint.router_pid, "twin")
    assert manager.controller_alive(endpoint)
    assert manager.router_alive(endpoint)

    described = manager.describe("twin")
    assert [r.state for r in described.replicas] == [ReplicaState.HEALTHY] * 2
    assert [(v.desired_replicas, v.current_replicas) for v in described.variants] == [(2, 2)]
    assert all(r.model_version and r.model_version.startswith("sha256:") for r in described.replicas)
    assert [e.name for e in manager.list_endpoints()] == ["twin"]
    with pytest.raises(ConflictError):
        manager.create(_config(tiny_model_dir, "twin"))

    # through the router: LLMClient (chat, unary and streamed) and plain HTTP on the TGI route
    with LLMClient(endpoint.url, api="openai", api_key=KEY) as client:
        assert client.chat([{"role": "user", "content": "hi"}], max_new_tokens=4).finish_reason
        chunks = list(client.chat_stream([{"role": "user", "content": "hi"}], max_new_tokens=4))
        assert chunks and chunks[-1].finished
    with LLMClient(endpoint.url, api="openai", api_key="wrong") as client, pytest.raises(UnauthorizedError):
        client.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    served = set()
    for _ in range(4):
        response = httpx.post(
            f"{endpoint.url}/generate",
            json={"inputs": "hello", "parameters": {"max_new_tokens": 3}},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["generated_text"], str)
        served.add(response.headers.get("x-twinserve-replica"))
    assert served <= {r.id for r in described.replicas}

    logs = manager.logs("twin", lines=5)
    assert set(logs) >= {r.id for r in described.replicas} | {"router"}

    pids = [r.pid for r in described.replicas if r.pid] + [endpoint.router_pid, endpoint.controller_pid]
    assert manager.delete("twin") is True
    assert all(process_gone(pid) for pid in pids)
    with pytest.raises(NotFoundError):
        manager.describe("twin")
    assert manager.store.replicas("twin") == []
    assert manager.delete("twin") is False  # idempotent


def test_broken_model_fails_with_reason_and_leaves_nothing(
    manager: LocalPlatform, tmp_path: Path, tiny_model_dir: Path
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    config = _config(tiny_model_dir, "half-broken", replicas=1)
    # one good variant and one broken one: the good replica must be stopped as well
    config = config.model_copy(
        update={
            "variants": [
                config.variants[0],
                config.variants[0].model_copy(update={"name": "bad", "model": str(broken)}),
            ]
        }
    )
    before = _live_children()  # e.g. a session's redis-server, when tests share this process
    with pytest.raises(ReplicaStartError) as info:
        manager.create(config)
    endpoint = manager.store.get_endpoint("half-broken")
    assert endpoint.status is EndpointStatus.FAILED
    assert endpoint.failure_reason and "failed to load" in endpoint.failure_reason
    assert info.value.log_tail in endpoint.failure_reason
    assert manager.store.replicas("half-broken") == []
    assert endpoint.router_pid is None
    assert info.value.record.pid is not None and process_gone(info.value.record.pid)
    assert _live_children() - before == set()
    assert manager.delete("half-broken") is True


def test_no_wait_create_finishes_in_a_detached_process(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    endpoint = manager.create(_config(tiny_model_dir, "later"), wait=False)
    assert endpoint.status is EndpointStatus.CREATING
    deadline = time.monotonic() + 240
    while (
        manager.store.get_endpoint("later").status is EndpointStatus.CREATING and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    endpoint = manager.describe("later")
    assert endpoint.status is EndpointStatus.IN_SERVICE, endpoint.failure_reason
    assert endpoint.url and manager.router_alive(endpoint)
    assert "InService" in manager.logs("later")["control"]
    pids = [r.pid for r in endpoint.replicas if r.pid] + [endpoint.router_pid, endpoint.controller_pid]
    assert endpoint.controller_pid and manager.controller_alive(endpoint)
    assert manager.delete("later")  # router and replica were started by another process: stopped by pid
    assert all(process_gone(pid) for pid in pids if pid)


def _live_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
