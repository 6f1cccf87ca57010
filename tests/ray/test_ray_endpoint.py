"""An endpoint on Ray Serve, end to end on the tiny model: the CLI creates it on a running
cluster, clients speak TGI, OpenAI and `LLMClient` to it through Serve's proxy (streams
included), it scales 2 → 1 in place, updates under steady load without a failed request, rolls
back an update that cannot load, autoscales 1 → 2 → 1 on Serve's own autoscaler, surfaces
Serve's pending reason for resources the cluster lacks, and deletes to nothing.

The tests share one endpoint and run in file order (each starts from where the last left it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.factories import tiny_llama_dir
from tests.ray.conftest import RayCluster
from tests.steady_load import SteadyLoad, wait_until
from twinserve.client.llm_client import LLMClient
from twinserve.deploy.policies import TargetTrackingPolicy
from twinserve.deploy.spec import EndpointConfig, EndpointStatus, ReplicaState
from twinserve.deploy.state import StateStore
from twinserve.errors import UpdateRolledBackError
from twinserve.platforms.ray.cluster import serve_details
from twinserve.platforms.ray.platform import RayPlatform
from twinserve.registry.store import ModelRegistry

KEY = "ray-test-key-8f2c"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = {"inputs": "hello there", "parameters": {"max_new_tokens": 8}}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-home")


@pytest.fixture(scope="module")
def platform(home: Path, ray_cluster: RayCluster) -> RayPlatform:
    # the state file the CLI uses under TWINSERVE_HOME=home
    return RayPlatform(StateStore(home / "endpoints" / "state.db"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """blue: a folder; green: version 1 of `twin-model` in a registry (champion), which the
    replicas reach through the registry settings of this process; broken: cannot load."""
    root = tmp_path_factory.mktemp("ray-models")
    broken = tiny_llama_dir(root / "broken", seed=2)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWINSERVE_REGISTRY_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("TWINSERVE_REGISTRY_ARTIFACTS", str(root / "artifacts"))
        registry = ModelRegistry()
        registry.import_model("twin-model", tiny_llama_dir(root / "green", seed=1))
        registry.set_alias("twin-model", "champion", 1)
        yield {"blue": tiny_llama_dir(root / "blue"), "green": root / "green", "broken": broken}


def twinserve(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TWINSERVE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "twinserve.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def url(home: Path, platform: RayPlatform, models: dict[str, Path], ray_cluster: RayCluster) -> Iterator[str]:
    """Endpoint `twin` as the CLI creates it: 2 replicas, an API key, on the running cluster."""
    created = twinserve(
        home,
        *("endpoint", "create", "twin", "--model", str(models["blue"]), "--replicas", "2"),
        *("--dtype", "float32", "--api-key", KEY, "--platform", "ray", "--ray-address", ray_cluster.address),
    )
    assert created.returncode == 0, created.stderr
    ep = platform.describe("twin")
    assert ep.url is not None and ep.url in created.stdout
    yield ep.url
    if "twin" in {e.name for e in platform.store.list_endpoints()}:
        platform.delete("twin")


def healthy_ids(platform: RayPlatform) -> set[str]:
    return {r.id for r in platform.describe("twin").replicas if r.state is ReplicaState.HEALTHY}


def test_created_with_two_healthy_replicas_behind_the_proxy(platform: RayPlatform, url: str) -> None:
    ep = platform.describe("twin")
    assert ep.status is EndpointStatus.IN_SERVICE
    assert ep.config.platform.type == "ray"
    assert len(healthy_ids(platform)) == 2
    assert ep.variants[0].current_replicas == 2
    assert url.endswith("/twin")
    # the key reached the replicas (401 without it) and nothing Serve reports shows it
    assert httpx.post(f"{url}/generate", json=PROMPT).status_code == 401
    assert KEY not in json.dumps(serve_details(), default=str)


def test_tgi_openai_and_the_client_through_the_proxy(url: str) -> None:
    answers = {
        httpx.post(f"{url}/generate", json=PROMPT, headers=AUTH).json()["generated_text"] for _ in range(4)
    }
    assert len(answers) == 1, "two replicas of one pinned model must answer greedy requests alike"
    (greedy,) = answers

    with httpx.stream("POST", f"{url}/generate_stream", json=PROMPT, headers=AUTH) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 8 and events[-1]["generated_text"] == greedy

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    chat = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6
    )
    assert chat.choices[0].finish_reason in ("length", "stop")
    chunks = list(
        oai.completions.create(model="tiny", prompt="hello there", max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy

    with LLMClient(url, api_key=KEY) as client:
        assert client.generate("hello there", max_new_tokens=8).text == greedy
        assert "".join(c.text for c in client.generate_stream("hello there", max_new_tokens=8)) == greedy
        assert client.health()

    metrics = httpx.get(f"{url}/metrics").text
    assert "tgi_request_count" in metrics


def test_scale_two_to_one_in_place(platform: RayPlatform, url: str) -> None:
    before = healthy_ids(platform)
    ep = platform.scale("twin", 1)
    assert ep.variants[0].desired_replicas == 1
    wait_until(lambda: len(platform.describe("twin").replicas) == 1, 60, "one replica left")
    assert healthy_ids(platform) <= before, "a scale must keep a running replica, not restart it"
    assert httpx.post(f"{url}/generate", json=PROMPT, headers=AUTH).status_code == 200


def _metric(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name))


def test_streams_pass_the_proxy_unbuffered_and_logs_name_each_replica(
    platform: RayPlatform, url: str
) -> None:
    succeeded = _metric(url, "tgi_request_success")
    cancelled = _metric(url, 'tgi_request_failure{err="cancelled"}')
    long = {"inputs": "hi", "parameters": {"max_new_tokens": 450, "ignore_eos": True}}
    with httpx.stream("POST", f"{url}/generate_stream", json=long, headers=AUTH, timeout=60) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
    assert json.loads(first[5:])["index"] == 1
    # hanging up after the first token cancels the generation in the replica: the token came
    # through while it ran (a proxy that buffered would hand it over only once it had finished)
    wait_until(
        lambda: _metric(url, 'tgi_request_failure{err="cancelled"}') == cancelled + 1, 30, "the cancellation"
    )
    assert _metric(url, "tgi_request_success") == succeeded

    logs = platform.logs("twin", lines=200)
    (replica,) = healthy_ids(platform)
    assert "GET /twin/metrics 200" in logs[replica], "Serve's access log of the replica"
    assert "serve-controller" in logs


def test_update_under_steady_load_fails_no_request(
    platform: RayPlatform, url: str, models: dict[str, Path]
) -> None:
    blue = healthy_ids(platform)
    ep = platform.describe("twin")
    with SteadyLoad(url, headers=AUTH) as load:
        wait_until(lambda: load.ok >= 5, 60, "traffic before the update")
        updated = platform.update("twin", ep.config_with_model("models:/twin-model@champion"))
        served = load.ok
        wait_until(lambda: load.ok >= served + 5, 60, "traffic after the update")
    load.check()
    assert updated.generation == ep.generation + 1
    pin = updated.config.variants[0].pinned
    assert pin is not None and (pin.kind, pin.name, pin.version) == ("registry", "twin-model", 1)
    info = httpx.get(f"{url}/info", headers=AUTH).json()
    assert (info["registry_version"], info["weights_sha256"]) == (1, pin.content_sha256)
    green = healthy_ids(platform)
    assert green and not green & blue, "every replica of the new generation is new"
    assert set(load.replicas) & blue and set(load.replicas) & green, "both generations served the load"


def test_an_update_that_cannot_load_is_rolled_back(
    platform: RayPlatform, url: str, models: dict[str, Path]
) -> None:
    ep = platform.describe("twin")
    serving = healthy_ids(platform)
    with SteadyLoad(url, clients=2, headers=AUTH) as load:
        wait_until(lambda: load.ok >= 3, 60, "traffic before the update")
        target = ep.config_with_model(str(models["broken"]))
        assert target.platform.ray is not None
        target.platform.ray.max_constructor_retries = 1  # one failed load is enough to know
        with pytest.raises(UpdateRolledBackError, match="hidden_act"):
            platform.update("twin", target)
    load.check()
    after = platform.describe("twin")
    assert after.status is EndpointStatus.IN_SERVICE
    assert after.generation == ep.generation
    assert after.config.variants[0].pinned == ep.config.variants[0].pinned
    assert healthy_ids(platform) == serving, "the serving replicas never stopped"
    assert "hidden_act" in (after.failure_reason or "")


def test_autoscaling_out_under_a_burst_and_back(platform: RayPlatform, url: str) -> None:
    policy = TargetTrackingPolicy(
        target=1, min_replicas=1, max_replicas=2, scale_out_cooldown_s=0, scale_in_cooldown_s=2, lookback_s=1
    )
    ep = platform.set_autoscaling("twin", policy)
    assert ep.config.autoscaling == policy
    stop = threading.Event()

    def burst() -> None:
        with httpx.Client(timeout=60, headers=AUTH) as client:
            while not stop.is_set():
                client.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 300}})

    threads = [threading.Thread(target=burst, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(healthy_ids(platform)) == 2, 120, "Serve scaling out to 2 replicas")
        assert platform.describe("twin").variants[0].desired_replicas == 2
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    wait_until(lambda: len(platform.describe("twin").replicas) == 1, 120, "Serve scaling back in to 1")
    ep = platform.set_autoscaling("twin", None)
    assert ep.config.autoscaling is None


def test_resources_the_cluster_lacks_show_serves_pending_reason(
    platform: RayPlatform, models: dict[str, Path], ray_cluster: RayCluster
) -> None:
    config = EndpointConfig.from_dict(
        {
            "name": "greedy",
            "variants": [{"model": str(models["blue"])}],
            "drain_timeout_s": 1,  # Serve waits this long to stop even a replica it never placed
            "platform": {"type": "ray", "ray": {"address": ray_cluster.address, "num_cpus": 64}},
        }
    )
    ep = platform.create(config, wait=False)
    assert ep.status is EndpointStatus.CREATING
    try:
        wait_until(
            lambda: "CPU" in (platform.describe("greedy").failure_reason or ""), 60, "Serve's pending reason"
        )
        assert platform.describe("greedy").status is EndpointStatus.CREATING
    finally:
        assert platform.delete("greedy")
    assert "greedy" not in ((serve_details() or {}).get("applications") or {})


def test_delete_leaves_no_application_and_no_replica(home: Path, platform: RayPlatform, url: str) -> None:
    import ray

    deleted = twinserve(home, "endpoint", "delete", "twin")
    assert deleted.returncode == 0, deleted.stderr
    assert "twin" not in {e.name for e in platform.store.list_endpoints()}
    assert "twin" not in ((serve_details() or {}).get("applications") or {})

    def replica_actors() -> list[str]:
        named = ray.util.list_named_actors(all_namespaces=True)
        return [a["name"] for a in named if "SERVE_REPLICA" in a["name"]]

    # a stopped actor leaves the cluster's table a moment after Serve has let it go
    wait_until(lambda: not replica_actors(), 30, f"no replica actor left, still {replica_actors()}")
