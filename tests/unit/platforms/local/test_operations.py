"""Blue/green update, rollback, scale, reconcile and the controller, on real processes (tiny model)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.factories import tiny_llama_dir
from tests.servers import dead_holder, process_gone
from tests.steady_load import SteadyLoad, wait_until
from twinserve.deploy.spec import EndpointConfig, EndpointStatus, ReplicaState
from twinserve.errors import BusyError, UpdateRolledBackError, ValidationError
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.processes import running


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model with other weights: the 'new version' of an update."""
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama-v2"), seed=1)


def _config(model: Path, name: str = "twin", *, replicas: int = 1, **extra: object) -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": name,
            "startup_timeout_s": 240,
            "drain_timeout_s": 5,
            "variants": [
                {"model": str(model), "replicas": replicas, "dtype": "float32", "device": "cpu", "threads": 1}
            ],
            **extra,
        }
    )


def test_blue_green_update_drops_no_request(
    manager: LocalPlatform, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir, replicas=2), controller=False)
    assert endpoint.url
    blue = {r.id: r.pid for r in endpoint.replicas}
    messages: list[str] = []
    with SteadyLoad(endpoint.url) as load:
        wait_until(lambda: load.ok >= 5, 60, "traffic before the update")
        target = manager.config_with_model("twin", str(other_model_dir))
        updated = manager.update("twin", target, progress=messages.append)
        served_before_end = load.ok
        wait_until(lambda: load.ok >= served_before_end + 5, 60, "traffic after the update")
    load.check()
    assert updated.status is EndpointStatus.IN_SERVICE and updated.generation == 2
    assert updated.url == endpoint.url  # one stable URL
    assert updated.config.variants[0].model == str(other_model_dir)
    # green kept blue's replica count; blue is gone, its processes stopped
    green = updated.replicas
    assert len(green) == 2 and all(r.generation == 2 and r.state is ReplicaState.HEALTHY for r in green)
    assert not set(blue) & {r.id for r in green}
    assert all(process_gone(pid) for pid in blue.values() if pid)
    assert load.replicas[-1] in {r.id for r in green}
    assert any("traffic: 100%" in m for m in messages)


def test_canary_steps_split_traffic_while_baking(
    manager: LocalPlatform, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir), controller=False)
    assert endpoint.url
    url = endpoint.url
    seen: dict[str, set[str]] = {}

    def progress(message: str) -> None:
        if message.startswith("baking"):  # mid-canary: both generations take traffic
            for _ in range(12):
                r = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
                assert r.status_code == 200
                gen = manager.store.get_replica(r.headers["x-twinserve-replica"]).generation
                seen.setdefault("baking", set()).add(str(gen))

    manager.update("twin", _config(other_model_dir), canary_percent=[50], bake_s=1, progress=progress)
    assert seen["baking"] == {"1", "2"}


def test_update_to_a_broken_version_rolls_back_and_keeps_serving(
    manager: LocalPlatform, tiny_model_dir: Path, tmp_path: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir), controller=False)
    assert endpoint.url
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    blue_pid = endpoint.replicas[0].pid
    with SteadyLoad(endpoint.url, clients=2) as load:
        with pytest.raises(UpdateRolledBackError) as info:
            manager.update("twin", _config(broken))
        before = load.ok
        wait_until(lambda: load.ok > before + 2, 60, "traffic after the rollback")
    load.check()
    assert "rolled back" in str(info.value)
    after = manager.describe("twin")
    assert after.status is EndpointStatus.IN_SERVICE and after.generation == 1 and after.target is None
    assert after.failure_reason and "rolled back" in after.failure_reason
    assert "failed to load" in after.failure_reason  # the green replica's log says why
    assert [r.pid for r in after.replicas] == [blue_pid]
    assert after.config.variants[0].model == str(tiny_model_dir)


def test_scale_out_and_in_records_events(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    policy = {"type": "target_tracking", "target": 4, "min_replicas": 1, "max_replicas": 2}
    manager.create(_config(tiny_model_dir, autoscaling=policy), controller=False)
    with pytest.raises(ValidationError):
        manager.scale("twin", 3)  # outside the autoscaling bounds
    out = manager.scale("twin", 2)
    assert [(v.desired_replicas, v.current_replicas) for v in out.variants] == [(2, 2)]
    newest = max(out.replicas, key=lambda r: r.started_at)
    back = manager.scale("twin", 1)
    assert [(v.desired_replicas, v.current_replicas) for v in back.variants] == [(1, 1)]
    assert newest.id not in {r.id for r in back.replicas}  # the newest replica goes first
    assert newest.pid and process_gone(newest.pid)
    events = manager.events("twin")
    assert [(e.from_replicas, e.to_replicas, e.reason) for e in events] == [
        (1, 2, "manual scale"),
        (2, 1, "manual scale"),
    ]
    assert back.url
    metrics = httpx.get(f"{back.url}/router/metrics", timeout=10).text  # exported for Prometheus
    for line in (
        'twinserve_endpoint_scaling_events_total{direction="out",endpoint="twin",variant="primary"} 1.0',
        'twinserve_endpoint_scaling_events_total{direction="in",endpoint="twin",variant="primary"} 1.0',
        'twinserve_endpoint_desired_replicas{endpoint="twin",variant="primary"} 1.0',
        'twinserve_endpoint_replicas{endpoint="twin",group="primary@1"} 1.0',
    ):
        assert line in metrics, metrics


def test_one_operation_at_a_time(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    manager.create(_config(tiny_model_dir), controller=False)
    manager.store.begin_operation("twin", "update", EndpointStatus.UPDATING)  # held by this live process
    with pytest.raises(BusyError, match="running update"):
        manager.begin("twin", "scale", EndpointStatus.UPDATING, lambda _: None, wait_s=0)


def test_reconcile_replaces_dead_replicas_and_restarts_the_router(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir, replicas=2), controller=False)
    assert endpoint.url and endpoint.router_pid
    victim = endpoint.replicas[0]
    assert victim.pid
    os.kill(victim.pid, signal.SIGKILL)
    os.kill(endpoint.router_pid, signal.SIGKILL)
    wait_until(lambda: not running(victim.pid or 0), 10, "the replica to die")
    actions = manager.reconcile("twin")
    assert any("died" in a for a in actions) and any("router" in a for a in actions)
    after = manager.describe("twin")
    assert after.url == endpoint.url and after.router_pid != endpoint.router_pid
    assert len(after.replicas) == 2 and victim.id not in {r.id for r in after.replicas}
    assert all(r.state is ReplicaState.HEALTHY for r in after.replicas)
    r = httpx.post(
        f"{after.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60
    )
    assert r.status_code == 200
    assert manager.reconcile("twin") == []  # nothing left to do


def test_reconcile_rolls_back_an_interrupted_update(
    manager: LocalPlatform, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir), controller=False)
    # an update whose process died after starting green: state says so, a green replica runs
    manager.store.begin_operation("twin", "update", EndpointStatus.UPDATING)
    target = _config(other_model_dir)
    green = manager.runtime.start_replica(target, target.variants[0], generation=2)
    dead = dead_holder()
    manager.store.update_endpoint(
        "twin",
        lambda e: e.model_copy(update={"target": target, "target_share": 0.5, "operation_holder": dead}),
    )
    actions = manager.reconcile("twin")
    assert any("interrupted update" in a for a in actions)
    after = manager.describe("twin")
    assert after.status is EndpointStatus.IN_SERVICE and after.target is None and after.operation is None
    assert [r.id for r in after.replicas] == [endpoint.replicas[0].id]
    assert green.pid and process_gone(green.pid)


def test_controller_replaces_a_dead_replica(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    endpoint = manager.create(_config(tiny_model_dir))
    assert endpoint.controller_pid and manager.controller_alive(endpoint)
    victim = endpoint.replicas[0]
    assert victim.pid
    os.kill(victim.pid, signal.SIGKILL)

    def replaced() -> bool:
        replicas = manager.describe("twin").replicas
        return (
            len(replicas) == 1 and replicas[0].id != victim.id and replicas[0].state is ReplicaState.HEALTHY
        )

    wait_until(replaced, 120, "the controller to replace the replica")
    assert "died" in manager.logs("twin")["controller"]


def test_autoscaling_follows_a_burst_of_streams(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    policy = {
        "type": "target_tracking",
        "target": 1,
        "min_replicas": 1,
        "max_replicas": 2,
        "lookback_s": 3,
        "scale_out_cooldown_s": 1,
        "scale_in_cooldown_s": 3,
    }
    endpoint = manager.create(_config(tiny_model_dir, autoscaling=policy))
    assert endpoint.url
    with SteadyLoad(endpoint.url, clients=4) as load:
        wait_until(lambda: manager.describe("twin").variants[0].current_replicas == 2, 120, "a scale-out")
    load.check()
    wait_until(lambda: manager.describe("twin").variants[0].desired_replicas == 1, 120, "a scale-in")
    wait_until(lambda: len(manager.describe("twin").replicas) == 1, 60, "the extra replica to stop")
    events = manager.events("twin")
    assert [(e.from_replicas, e.to_replicas) for e in events] == [(1, 2), (2, 1)]
    assert events[0].metric == "concurrent_requests_per_replica" and (events[0].metric_value or 0) > 1


def test_update_without_waiting_runs_in_a_detached_process(
    manager: LocalPlatform, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    manager.create(_config(tiny_model_dir, api_key="detached-key"), controller=False)
    target = manager.config_with_model("twin", str(other_model_dir))
    manager.update_detached("twin", target)
    assert manager.store.get_endpoint("twin").status is EndpointStatus.UPDATING
    wait_until(
        lambda: manager.store.get_endpoint("twin").status is EndpointStatus.IN_SERVICE, 240, "the update"
    )
    after = manager.describe("twin")
    assert after.generation == 2 and after.failure_reason is None, after.failure_reason
    assert after.config.api_key and after.config.api_key.get_secret_value() == "detached-key"
    log = manager.logs("twin")["control"]
    assert "InService on generation 2" in log and "detached-key" not in log


def test_a_canary_that_dies_while_baking_is_rolled_back(
    manager: LocalPlatform, tiny_model_dir: Path, other_model_dir: Path
) -> None:
    endpoint = manager.create(_config(tiny_model_dir), controller=False)
    assert endpoint.url

    def progress(message: str) -> None:
        if message.startswith("baking"):
            green = [r for r in manager.store.replicas("twin") if r.generation == 2]
            assert green and green[0].pid
            os.kill(green[0].pid, signal.SIGKILL)

    with SteadyLoad(endpoint.url, clients=2) as load:
        with pytest.raises(UpdateRolledBackError, match="while baking"):
            manager.update("twin", _config(other_model_dir), canary_percent=[50], bake_s=5, progress=progress)
        before = load.ok
        wait_until(lambda: load.ok > before + 2, 60, "traffic after the rollback")
    # a request the killed canary had not answered yet is retried on the old replica; only a
    # stream it had started answering can be lost (never re-run: its tokens were sent)
    load.check(max_failures=1)
    after = manager.describe("twin")
    assert after.generation == 1 and [r.id for r in after.replicas] == [endpoint.replicas[0].id]


def test_delete_stops_a_replica_that_was_never_recorded(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    config = _config(tiny_model_dir)
    manager.create(config, controller=False)
    # as if a control process died between starting a replica and recording it
    orphan = manager.runtime.start_replica(config, config.variants[0])
    manager.store.remove_replica(orphan.id)
    assert orphan.pid and running(orphan.pid)
    manager.delete("twin")
    assert not running(orphan.pid)


def test_an_update_cannot_change_the_api_key(manager: LocalPlatform, tiny_model_dir: Path) -> None:
    from twinserve.deploy.spec import Endpoint

    manager.store.put_endpoint(Endpoint.new(_config(tiny_model_dir, api_key="old-key")))  # state only
    with pytest.raises(ValidationError, match="cannot change the API key"):
        manager.update("twin", _config(tiny_model_dir, api_key="new-key"))
    with pytest.raises(ValidationError, match="cannot change the API key"):
        manager.update("twin", _config(tiny_model_dir))  # dropping it is a change too
    assert manager.store.get_endpoint("twin").operation is None  # refused before taking the endpoint


def test_the_controller_backs_off_from_a_replica_that_cannot_start(
    manager: LocalPlatform, tmp_path: Path
) -> None:
    from twinserve.deploy.spec import Endpoint
    from twinserve.platforms.local.controller import Controller

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    # InService with one desired replica and none running (it died; its model is gone now)
    manager.store.put_endpoint(
        Endpoint.new(_config(broken)).model_copy(update={"status": EndpointStatus.IN_SERVICE})
    )
    now = [0.0]
    controller = Controller(manager, "twin", reconcile_every=2.0, clock=lambda: now[0])

    def attempts() -> int:
        return len(list(manager.endpoint_dir("twin").glob("twin-primary-*.log")))

    for t, expected in ((0.0, 1), (3.0, 1), (4.1, 2), (10.0, 2), (12.2, 3)):
        now[0] = t
        assert controller.step()
        assert attempts() == expected, t  # 2 s, then 4, then 8: no tight restart loop
    ep = manager.store.get_endpoint("twin")
    assert ep.status is EndpointStatus.IN_SERVICE and ep.operation is None
    assert ep.failure_reason and "reconcile failed" in ep.failure_reason


def test_a_restarted_controller_keeps_the_cooldowns_of_the_recorded_events(
    manager: LocalPlatform, tiny_model_dir: Path
) -> None:
    from datetime import timedelta

    from twinserve.deploy.autoscale import LoadSample
    from twinserve.deploy.lease import utcnow
    from twinserve.deploy.policies import TargetTrackingPolicy
    from twinserve.deploy.spec import Endpoint, ScalingEvent
    from twinserve.platforms.local.controller import Controller

    policy = {"type": "target_tracking", "target": 1, "max_replicas": 4, "scale_out_cooldown_s": 60}
    config = _config(tiny_model_dir).model_copy(
        update={"autoscaling": TargetTrackingPolicy.model_validate(policy)}
    )
    manager.store.put_endpoint(Endpoint.new(config).model_copy(update={"status": EndpointStatus.IN_SERVICE}))
    # the controller that died had scaled out 20 s ago (wall clock)
    manager.store.record_event(
        ScalingEvent(
            endpoint="twin",
            variant="primary",
            from_replicas=1,
            to_replicas=2,
            reason="earlier process",
            time=utcnow() - timedelta(seconds=20),
        )
    )
    now = [500.0]
    controller = Controller(manager, "twin", clock=lambda: now[0])
    scaler = controller._scaler(manager.store.get_endpoint("twin"))
    assert scaler is not None
    scaler.observe("primary", LoadSample(time=now[0], replicas=2, in_flight=8, invocations=0))
    assert scaler.decide("primary", 2) is None  # 20 s into a 60 s cooldown: no scale-out yet
    now[0] += 41
    scaler.observe("primary", LoadSample(time=now[0], replicas=2, in_flight=8, invocations=0))
    decision = scaler.decide("primary", 2)
    assert decision is not None and decision.to_replicas == 4
