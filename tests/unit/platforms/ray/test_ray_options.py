"""The ray platform's mapping of our config onto Serve's, and its refusals, without a cluster:
what Serve cannot do is refused at create with the setting named, a missing extra or an
unreachable cluster is a clear error within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinserve.deploy.policies import StepScalingPolicy, TargetTrackingPolicy
from twinserve.deploy.spec import EndpointConfig
from twinserve.errors import UnreachableError, ValidationError
from twinserve.platforms.ray.cluster import check_reachable, require_ray
from twinserve.platforms.ray.options import (
    autoscaling_config,
    check_supported,
    code_version,
    deployment_options,
    serve_flags,
)


def ray_config(**endpoint: object) -> EndpointConfig:
    data = {
        "name": "twin",
        "variants": [{"model": "/models/tiny", "threads": 2}],
        "platform": {"type": "ray"},
    }
    return EndpointConfig.from_dict({**data, **endpoint})


def test_target_tracking_maps_onto_serves_autoscaling_config() -> None:
    policy = TargetTrackingPolicy(
        target=4,
        min_replicas=0,
        max_replicas=5,
        scale_out_cooldown_s=7,
        scale_in_cooldown_s=90,
        lookback_s=30,
    )
    assert autoscaling_config(policy, initial=2) == {
        "min_replicas": 0,
        "max_replicas": 5,
        "initial_replicas": 2,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 7,
        "downscale_delay_s": 90,
        "look_back_period_s": 30,
    }


def test_scale_to_zero_is_allowed_on_ray_only() -> None:
    policy = {"type": "target_tracking", "target": 2, "min_replicas": 0, "max_replicas": 2}
    assert ray_config(autoscaling=policy).autoscaling is not None
    with pytest.raises(ValueError, match="or the ray platform"):
        EndpointConfig.from_dict({"name": "twin", "variants": [{"model": "m"}], "autoscaling": policy})


def test_options_carry_resources_concurrency_drain_and_a_surge_rollout() -> None:
    config = ray_config(drain_timeout_s=12)
    options = deployment_options(config, 3, config.platform.ray)  # type: ignore[arg-type]
    assert options["num_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert options["max_ongoing_requests"] == 128
    assert options["graceful_shutdown_timeout_s"] == 12
    assert options["max_surge_percent"] == 100
    cuda = ray_config(
        variants=[{"model": "m", "device": "cuda", "limits": {"max_concurrent_requests": 16}}],
        platform={"type": "ray", "ray": {"num_cpus": 0.5}},
    )
    options = deployment_options(cuda, 1, cuda.platform.ray)  # type: ignore[arg-type]
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0}
    assert options["max_ongoing_requests"] == 16


def test_a_target_above_the_replicas_concurrency_is_refused() -> None:
    config = ray_config(
        variants=[{"model": "m", "limits": {"max_concurrent_requests": 4}}],
        autoscaling={"type": "target_tracking", "target": 8, "min_replicas": 1, "max_replicas": 2},
    )
    with pytest.raises(ValidationError, match="exceeds the requests a replica takes"):
        deployment_options(config, 1, config.platform.ray)  # type: ignore[arg-type]


def test_the_version_changes_with_the_generation_and_the_model_not_the_count_or_the_key() -> None:
    settings = ray_config().platform.ray
    assert settings is not None
    base = ray_config()
    assert code_version(base, 1, settings) == code_version(ray_config(api_key="other-key"), 1, settings)
    assert code_version(base, 1, settings) != code_version(base, 2, settings)
    moved = ray_config(variants=[{"model": "/models/other", "threads": 2}])
    assert code_version(base, 1, settings) != code_version(moved, 1, settings)
    assert serve_flags(ray_config(api_key="k"), base.variants[0], settings)["api_key"] == "k"


@pytest.mark.parametrize(
    ("endpoint", "refusal"),
    [
        ({"variants": [{"model": "a"}, {"name": "b", "model": "b"}]}, "one variant"),
        ({"async": {}}, "async endpoints run on the local or sagemaker"),
        (
            {
                "autoscaling": {
                    "type": "target_tracking",
                    "metric": "invocations_per_replica_per_minute",
                    "target": 5,
                    "max_replicas": 2,
                }
            },
            "ongoing requests per replica",
        ),
        (
            {
                "autoscaling": {
                    "type": "target_tracking",
                    "target": 5,
                    "max_replicas": 2,
                    "disable_scale_in": True,
                }
            },
            "always scales in",
        ),
    ],
)
def test_what_serve_cannot_run_is_refused_naming_it(endpoint: dict[str, object], refusal: str) -> None:
    with pytest.raises(ValidationError, match=refusal):
        check_supported(ray_config(**endpoint))


def test_step_scaling_is_refused() -> None:
    policy = StepScalingPolicy(
        threshold=4,
        step_adjustments=[{"metric_interval_lower_bound": 0, "scaling_adjustment": 1}],
        max_replicas=3,
    )
    with pytest.raises(ValidationError, match="target tracking only"):
        autoscaling_config(policy, 1)


def test_an_unreachable_cluster_is_an_error_within_seconds() -> None:
    # our own socket check answers (ray.init would retry for a minute): its message, not Ray's
    with pytest.raises(UnreachableError, match="no Ray cluster answers at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    with pytest.raises(ValidationError, match="is not auto, HOST:PORT"):
        check_reachable("nowhere")


def test_the_cli_names_the_unreachable_cluster(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "twinserve.cli.main",
            "endpoint",
            "create",
            "twin",
            "--model",
            str(model),
            "--platform",
            "ray",
            "--ray-address",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TWINSERVE_HOME": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert "no Ray cluster answers at 127.0.0.1:1" in proc.stderr


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ValidationError, match=r"pip install 'twinserve\[ray\]'"):
        require_ray()
