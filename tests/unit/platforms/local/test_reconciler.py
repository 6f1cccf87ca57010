"""The reconciler's rule for a live replica that fails `/health`, on a real endpoint (tiny model).

A replica that still runs but does not answer is replaced only once it has failed for
UNHEALTHY_GRACE_S (30 s) as seen by repeated reconciles, not at the first failed probe (a
replica busy with a long prefill must not be shot). The reconciler's clock is stepped by the
test, so nothing sleeps 30 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.servers import process_gone, until
from twinserve.deploy.spec import EndpointConfig, ReplicaState
from twinserve.platforms.local import local_runtime, reconciler
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.reconciler import UNHEALTHY_GRACE_S


def _config(model: Path) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": "twin",
            "startup_timeout_s": 240,
            "drain_timeout_s": 0,
            "variants": [
                {"model": str(model), "replicas": 1, "dtype": "float32", "device": "cpu", "threads": 1}
            ],
        }
    )


def test_a_replica_failing_health_for_the_grace_period_is_replaced(
    manager: LocalPlatform, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = manager.create(_config(tiny_model_dir), controller=False)
    victim = endpoint.replicas[0]
    assert victim.pid and endpoint.url
    now = [1000.0]
    monkeypatch.setattr(reconciler, "time", SimpleNamespace(monotonic=lambda: now[0]))
    # a stopped process ignores SIGTERM until SIGKILL: don't wait out the exit grace for it
    monkeypatch.setattr(local_runtime, "_EXIT_GRACE_S", 0.0)
    os.kill(victim.pid, signal.SIGSTOP)  # hung: its port takes connections, /health never answers
    try:
        assert manager.reconcile("twin") == []  # first seen failing: its grace starts now
        assert manager.store.get_replica(victim.id).state is ReplicaState.UNHEALTHY
        now[0] += UNHEALTHY_GRACE_S - 1
        assert manager.reconcile("twin") == []  # 29 s: still given the benefit of the doubt
        assert manager.store.get_replica(victim.id).pid == victim.pid
        now[0] += 1
        actions = manager.reconcile("twin")
        assert f"replica {victim.id} failed /health for {UNHEALTHY_GRACE_S:.0f}s; replacing it" in actions
        assert until(lambda: process_gone(victim.pid or 0), 10)
        after = manager.describe("twin")
        assert [r.state for r in after.replicas] == [ReplicaState.HEALTHY]
        assert after.replicas[0].id != victim.id and after.url == endpoint.url
        r = httpx.post(
            f"{after.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60
        )
        assert r.status_code == 200 and r.headers["x-twinserve-replica"] == after.replicas[0].id
        assert manager.reconcile("twin") == []  # converged: nothing left to do
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
