"""LocalRuntime with real `twinserve serve` processes on the tiny model: start, probe, find, stop."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from tests.servers import process_gone
from twinserve.deploy.spec import Endpoint, EndpointConfig, ReplicaRecord, ReplicaState
from twinserve.deploy.state import StateStore
from twinserve.errors import ConflictError
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.runtime import ReplicaStartError, Runtime

ROOT = Path(__file__).resolve().parents[3]
KEY = "k3y-for-tests"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path))
    return tmp_path


def _store(home: Path, *endpoints: str) -> StateStore:
    """The state store under `home`, holding these endpoints (a replica row needs its endpoint's)."""
    store = StateStore(home / "endpoints" / "state.db")
    for name in endpoints:
        with contextlib.suppress(ConflictError):
            store.put_endpoint(Endpoint.new(EndpointConfig.single(name, "models:/llm-twin@champion")))
    return store


def _config(model: Path, name: str = "tiny") -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": name,
            "api_key": KEY,
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [
                {
                    "model": str(model),
                    "dtype": "float32",
                    "device": "cpu",
                    "threads": 1,
                    "limits": {"max_input_tokens": 64, "max_total_tokens": 128},
                }
            ],
        }
    )


def test_start_probe_find_stop(home: Path, tiny_model_dir: Path) -> None:
    runtime = LocalRuntime(_store(home, "tiny"), home=home)
    assert isinstance(runtime, Runtime)
    config = _config(tiny_model_dir)
    record = runtime.start_replica(config, config.variants[0])
    try:
        assert record.state is ReplicaState.HEALTHY
        assert record.pid is not None and record.model_version and record.model_version.startswith("sha256:")
        assert runtime.replica_alive(record)
        # the key came through the environment: required by the replica, absent from its command line
        assert httpx.post(f"{record.url}/generate", json={"inputs": "hi"}, timeout=30).status_code == 401
        ok = httpx.post(
            f"{record.url}/generate",
            json={"inputs": "hi", "parameters": {"max_new_tokens": 2}},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert ok.status_code == 200
        assert KEY not in " ".join(psutil.Process(record.pid).cmdline())
        assert "--threads" in psutil.Process(record.pid).cmdline()
        assert Path(record.log_path or "") == home / "endpoints" / "tiny" / f"{record.id}.log"
        assert runtime.replica_logs(record, lines=5).strip()
        # a control plane started afresh finds it from the state file alone
        found = LocalRuntime(_store(home), home=home).find_replicas("tiny")
        assert [(r.id, r.state) for r in found] == [(record.id, ReplicaState.HEALTHY)]
    finally:
        runtime.stop_replica(record, drain_timeout=2)
    assert record.pid is not None and not psutil.pid_exists(record.pid)
    assert not runtime.replica_alive(record)
    assert runtime.find_replicas("tiny") == []
    runtime.stop_replica(record, drain_timeout=2)  # idempotent


_STARTER = """
import sys
from pathlib import Path
from twinserve.errors import ConflictError
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.deploy.spec import EndpointConfig
from twinserve.deploy.state import StateStore

home = Path(sys.argv[1])
config = EndpointConfig.model_validate_json(sys.argv[2])
runtime = LocalRuntime(StateStore(home / "endpoints" / "state.db"), home=home)
print(runtime.start_replica(config, config.variants[0]).id)
"""


def test_replica_outlives_its_starter_and_is_stopped_by_another(home: Path, tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir, name="detached")
    _store(home, "detached")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    started = subprocess.run(
        [sys.executable, "-c", _STARTER, str(home), config.model_dump_json(exclude={"api_key"})],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    runtime = LocalRuntime(_store(home), home=home)  # a "later CLI process": no handle on the child
    [record] = runtime.find_replicas("detached")
    try:
        assert record.id == started.stdout.strip()
        assert record.state is ReplicaState.HEALTHY
        assert runtime.replica_alive(record)
    finally:
        runtime.stop_replica(record, drain_timeout=2)
    assert record.pid is not None and process_gone(record.pid)
    assert runtime.find_replicas("detached") == []


def test_stale_record_never_signals_a_reused_pid(home: Path) -> None:
    store = _store(home, "x")
    runtime = LocalRuntime(store, home=home)
    # the pid is alive but it is this test process, not a replica on that port
    stale = ReplicaRecord(
        id="x-primary-1", endpoint="x", variant="primary", pid=os.getpid(), port=1, url="http://127.0.0.1:1"
    )
    store.put_replica(stale.model_copy(update={"state": ReplicaState.HEALTHY}))
    assert not runtime.replica_alive(stale)
    assert [r.state for r in runtime.find_replicas("x")] == [ReplicaState.STOPPED]
    runtime.stop_replica(stale, drain_timeout=0)  # must not SIGTERM us
    assert store.replicas("x") == []


def test_broken_model_fails_with_log_tail(home: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    runtime = LocalRuntime(_store(home, "broken"), home=home)
    config = _config(broken, name="broken")
    with pytest.raises(ReplicaStartError) as info:
        runtime.start_replica(config, config.variants[0])
    err = info.value
    assert "did not become healthy" in str(err)
    assert "failed to load" in err.log_tail and err.log_tail in str(err)
    assert err.record.pid is not None and not psutil.pid_exists(err.record.pid)
    assert runtime.find_replicas("broken") == []
