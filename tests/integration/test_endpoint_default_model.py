"""A real-time endpoint of the real default model, served from the registry, end to end.

create from `models:/llm-twin@champion` → invoke through the router → blue/green update to
version 2 under load → an update to a broken version rolls back → scale out and in → delete,
with real processes (replicas, router, controller) and nothing left running at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.servers import process_gone
from twinserve.bench.endpoint_bench import LoadClients
from twinserve.client import LLMClient
from twinserve.deploy.spec import Endpoint, EndpointConfig, EndpointStatus, ReplicaState
from twinserve.deploy.state import StateStore
from twinserve.errors import UpdateRolledBackError
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.router.app import REPLICA_HEADER
from twinserve.registry.store import ModelRegistry

pytestmark = pytest.mark.integration

V1, V2 = "models:/llm-twin/1", "models:/llm-twin/2"


@pytest.fixture(scope="module")
def broken_version(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A temp registry: v1 = the default model (@champion), v2 = the same weights again, v3 = a
    version whose config.json is not JSON (its reference is yielded).

    Replicas resolve `models:/…` themselves, so the registry location goes in the environment
    they inherit.
    """
    tmp = tmp_path_factory.mktemp("endpoint-registry")
    uri, artifacts = f"sqlite:///{tmp / 'mlflow.db'}", str(tmp / "artifacts")
    reg = ModelRegistry(uri, artifacts)
    champion = reg.import_default()
    assert champion.version == 1 and "champion" in champion.aliases
    v2 = reg.import_model("llm-twin", default_model_path, copy=False, force=True)
    broken_dir = tmp / "broken"  # the registry takes it (tokenizer, safetensors); loading fails
    broken_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path / name, broken_dir / name)
    save_file({"x": np.zeros(1, dtype=np.float32)}, str(broken_dir / "model.safetensors"))
    (broken_dir / "config.json").write_text("{ not json")
    v3 = reg.import_model("llm-twin", broken_dir, copy=False)
    assert (v2.version, v3.version) == (2, 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWINSERVE_REGISTRY_URI", uri)
        mp.setenv("TWINSERVE_REGISTRY_ARTIFACTS", artifacts)
        yield v3.uri


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[LocalPlatform]:
    store = StateStore(tmp_path / "endpoints" / "state.db")
    manager = LocalPlatform(store, LocalRuntime(store, home=tmp_path))
    try:
        yield manager
    finally:  # whatever failed, no process outlives the test
        for endpoint in store.list_endpoints():
            manager.delete(endpoint.name)


def _config() -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": "twin",
            "startup_timeout_s": 180,
            "drain_timeout_s": 5,
            "variants": [{"model": "models:/llm-twin@champion", "threads": 1, "device": "cpu"}],
        }
    )


def _pids(endpoint: Endpoint) -> set[int]:
    pids = {r.pid for r in endpoint.replicas} | {endpoint.router_pid, endpoint.controller_pid}
    return {pid for pid in pids if pid is not None}


def _invoke(url: str, replica_id: str) -> None:
    """LLMClient chat (whole and streamed) and TGI /generate, all through the router."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with LLMClient(url, max_retries=0, timeout=120) as client:
        answer = client.chat(question, max_new_tokens=20)
        assert "Paris" in answer.text
        chunks = list(client.chat_stream(question, max_new_tokens=20))
        assert chunks[-1].finished and "Paris" in "".join(c.text for c in chunks)
        generated = client.generate("The capital of France is", max_new_tokens=8)
        assert generated.text and 1 <= (generated.generated_tokens or 0) <= 8
    r = httpx.post(
        f"{url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}, timeout=120
    )
    assert r.status_code == 200 and isinstance(r.json()["generated_text"], str)
    assert r.headers[REPLICA_HEADER] == replica_id


def _update_under_load(manager: LocalPlatform, url: str, model: str) -> tuple[Endpoint, LoadClients]:
    with LoadClients(url, clients=2, max_new_tokens=4) as load:
        load.wait_ok(4, 120)
        updated = manager.update("twin", manager.config_with_model("twin", model))
        load.wait_ok(4, 120, since=time.monotonic())  # and traffic goes on afterwards
    return updated, load


def test_default_model_endpoint_from_create_to_delete(broken_version: str, manager: LocalPlatform) -> None:
    seen_pids: set[int] = set()

    # create from the champion alias
    created = manager.create(_config())
    seen_pids |= _pids(created)
    assert created.status is EndpointStatus.IN_SERVICE and created.url and created.controller_pid
    url = created.url
    (replica,) = created.replicas
    assert replica.state is ReplicaState.HEALTHY and replica.model_version == V1

    _invoke(url, replica.id)
    described = manager.describe("twin")
    assert [(r.id, r.state, r.model_version) for r in described.replicas] == [
        (replica.id, ReplicaState.HEALTHY, V1)
    ]

    # blue/green to v2 under steady load: no request fails
    updated, load = _update_under_load(manager, url, V2)
    seen_pids |= _pids(updated)
    failures = [f"{o.error}: {o.detail}" for o in load.outcomes if o.error]
    assert failures == [], json.dumps(failures[:5], indent=1)
    assert updated.status is EndpointStatus.IN_SERVICE and updated.generation == 2 and updated.url == url
    (green,) = updated.replicas
    assert green.model_version == V2 and green.id != replica.id
    assert replica.pid and process_gone(replica.pid)
    assert {o.replica for o in load.outcomes[-2:]} == {green.id}

    # a broken version: rolled back, still InService on v2, still answering
    with pytest.raises(UpdateRolledBackError, match="rolled back"):
        manager.update("twin", manager.config_with_model("twin", broken_version))
    after = manager.describe("twin")
    assert after.status is EndpointStatus.IN_SERVICE and after.generation == 2 and after.target is None
    assert after.failure_reason and "rolled back" in after.failure_reason
    assert [(r.id, r.model_version) for r in after.replicas] == [(green.id, V2)]
    assert after.config.variants[0].model == V2
    _invoke(url, green.id)

    # scale out and back in
    out = manager.scale("twin", 2)
    seen_pids |= _pids(out)
    assert [(v.desired_replicas, v.current_replicas) for v in out.variants] == [(2, 2)]
    assert {r.model_version for r in out.replicas} == {V2}
    back = manager.scale("twin", 1)
    assert [r.id for r in back.replicas] == [green.id]  # the newest goes first
    assert [(e.from_replicas, e.to_replicas) for e in manager.events("twin")] == [(1, 2), (2, 1)]

    # delete: every process this endpoint ever had is gone
    assert manager.delete("twin")
    assert manager.store.list_endpoints() == []
    alive = sorted(pid for pid in seen_pids if not process_gone(pid))
    assert alive == [], f"processes left behind: {alive}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
