"""Endpoint config, policies and state models: validation, YAML round trip, secrets kept out of dumps."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from twinserve.deploy.policies import StepScalingPolicy, TargetTrackingPolicy
from twinserve.deploy.spec import (
    MASKED_SECRET,
    Endpoint,
    EndpointConfig,
    EndpointStatus,
    ReplicaState,
    ServingLimits,
)

FULL_YAML = """
name: twin
api_key: ${TWIN_KEY}
startup_timeout_s: 120
drain_timeout_s: 5
variants:
  - name: blue
    model: models:/llm-twin@champion
    replicas: 2
    threads: 2
    device: cpu
    dtype: float32
    limits: {max_input_tokens: 1024, max_total_tokens: 2048, max_concurrent_requests: 32}
    weight: 90
  - name: green
    model: models:/llm-twin/4
    weight: 10
autoscaling:
  type: target_tracking
  metric: concurrent_requests_per_replica
  target: 4
  min_replicas: 1
  max_replicas: 3
  scale_in_cooldown_s: 30
"""


def test_yaml_round_trip_keeps_env_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TWIN_KEY", "s3cret-key")
    path = tmp_path / "twin.yaml"
    path.write_text(FULL_YAML)
    config = EndpointConfig.from_yaml(path)
    assert config.api_key is not None and config.api_key.get_secret_value() == "s3cret-key"
    assert isinstance(config.autoscaling, TargetTrackingPolicy)
    assert config.variant("blue").limits.max_total_tokens == 2048
    dumped = config.to_yaml()
    assert "s3cret-key" not in dumped
    assert "${TWIN_KEY}" in dumped
    again = EndpointConfig.from_yaml(dumped)
    assert again == config


def test_api_key_never_in_repr_or_default_dump() -> None:
    config = EndpointConfig.single("twin", "/models/x", api_key="s3cret-key")
    assert "s3cret-key" not in repr(config)
    assert "s3cret-key" not in str(Endpoint.new(config))
    assert "s3cret-key" not in config.to_yaml()
    assert MASKED_SECRET in config.to_yaml()
    assert "s3cret-key" in config.to_yaml(reveal_secrets=True)
    # a masked dump cannot be loaded back as if the mask were the key
    with pytest.raises(ValidationError, match="masked"):
        EndpointConfig.from_yaml(config.to_yaml())
    assert EndpointConfig.from_yaml(config.to_yaml(reveal_secrets=True)) == config


def test_a_blank_api_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="set but empty"):
        EndpointConfig.single("twin", "/models/x", api_key="  ")


def test_missing_env_for_api_key_is_reported() -> None:
    with pytest.raises(ValueError, match=r"NO_SUCH_TWIN_VAR"):
        EndpointConfig.from_dict(
            {"name": "twin", "api_key": "${NO_SUCH_TWIN_VAR}", "variants": [{"model": "m"}]}
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "Twin_1", "variants": [{"model": "m"}]}, "name"),
        ({"name": "twin", "variants": []}, "at least 1"),
        ({"name": "twin", "variants": [{"model": "m"}], "colour": "red"}, "colour"),
        ({"name": "twin", "variants": [{"model": "m", "name": "a"}, {"model": "n", "name": "a"}]}, "unique"),
        ({"name": "twin", "variants": [{"model": "m", "replicas": 0}]}, "replicas"),
        ({"name": "twin", "variants": [{"model": "m", "threads": 0}]}, "threads"),
        ({"name": "twin", "variants": [{"model": "m", "device": "tpu"}]}, "device"),
        ({"name": "twin", "variants": [{"model": "m", "weight": 0}]}, "weight > 0"),
        (
            {
                "name": "twin",
                "variants": [{"model": "m", "limits": {"max_input_tokens": 10, "max_total_tokens": 5}}],
            },
            "max_input_tokens",
        ),
        (
            {
                "name": "twin",
                "variants": [{"model": "m"}],
                "autoscaling": {"type": "target_tracking", "target": 2, "min_replicas": 0, "max_replicas": 2},
            },
            "async endpoint",
        ),
        (
            {
                "name": "twin",
                "variants": [{"model": "m", "replicas": 5}],
                "autoscaling": {"type": "target_tracking", "target": 2, "max_replicas": 2},
            },
            "outside autoscaling",
        ),
        (
            {
                "name": "twin",
                "variants": [{"model": "m"}],
                "autoscaling": {"type": "target_tracking", "target": 2, "max_replicas": 2, "variant": "x"},
            },
            "not one of",
        ),
        (
            {
                "name": "twin",
                "variants": [{"model": "m"}],
                "autoscaling": {"type": "magic", "max_replicas": 2},
            },
            "magic",
        ),
    ],
)
def test_bad_configs_rejected(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EndpointConfig.model_validate(data)


def test_target_tracking_bounds() -> None:
    with pytest.raises(ValidationError, match="max_replicas"):
        TargetTrackingPolicy(target=1, min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="target"):
        TargetTrackingPolicy(target=0, max_replicas=2)


def test_step_scaling_shape_and_lookup() -> None:
    policy = StepScalingPolicy.model_validate(
        {
            "threshold": 4,
            "max_replicas": 4,
            "step_adjustments": [
                {"metric_interval_upper_bound": -2, "scaling_adjustment": -1},
                {"metric_interval_lower_bound": 0, "metric_interval_upper_bound": 4, "scaling_adjustment": 1},
                {"metric_interval_lower_bound": 4, "scaling_adjustment": 2},
            ],
        }
    )
    steps = [policy.step_for(v) for v in (1.0, 3.0, 4.0, 7.9, 8.0, 100.0)]
    assert [s.scaling_adjustment if s else None for s in steps] == [-1, None, 1, 1, 2, 2]
    with pytest.raises(ValidationError, match="overlap"):
        StepScalingPolicy.model_validate(
            {
                "threshold": 4,
                "max_replicas": 4,
                "step_adjustments": [
                    {"metric_interval_lower_bound": 0, "scaling_adjustment": 1},
                    {"metric_interval_lower_bound": 2, "scaling_adjustment": 2},
                ],
            }
        )
    with pytest.raises(ValidationError, match="empty"):
        StepScalingPolicy.model_validate(
            {
                "threshold": 1,
                "max_replicas": 2,
                "step_adjustments": [
                    {
                        "metric_interval_lower_bound": 2,
                        "metric_interval_upper_bound": 1,
                        "scaling_adjustment": 1,
                    }
                ],
            }
        )


def test_step_policy_is_chosen_by_type_in_yaml() -> None:
    config = EndpointConfig.from_yaml(
        "name: twin\nvariants: [{model: m}]\nautoscaling:\n  type: step_scaling\n  threshold: 3\n"
        "  max_replicas: 2\n  step_adjustments: [{metric_interval_lower_bound: 0, scaling_adjustment: 1}]\n"
    )
    assert isinstance(config.autoscaling, StepScalingPolicy)
    assert EndpointConfig.from_yaml(config.to_yaml()) == config


def test_limits_as_serve_flags_and_tgi_env() -> None:
    limits = ServingLimits(max_input_tokens=512, max_concurrent_requests=8)
    assert limits.serve_args() == ["--max-input-tokens", "512", "--max-concurrent-requests", "8"]
    assert limits.serve_env() == {"MAX_INPUT_TOKENS": "512", "MAX_CONCURRENT_REQUESTS": "8"}
    assert ServingLimits().serve_args() == []


def test_status_helpers() -> None:
    assert EndpointStatus.IN_SERVICE.is_terminal and EndpointStatus.FAILED.is_terminal
    assert not EndpointStatus.UPDATING.is_terminal
    assert EndpointStatus.ROLLING_BACK.accepts_traffic
    assert not EndpointStatus.CREATING.accepts_traffic and not EndpointStatus.DELETING.accepts_traffic
    assert EndpointStatus("InService") is EndpointStatus.IN_SERVICE
    assert ReplicaState.HEALTHY.serves and not ReplicaState.DRAINING.serves
    assert not ReplicaState.STOPPED.is_live


def test_new_endpoint_aims_at_initial_replicas() -> None:
    config = EndpointConfig.model_validate(
        {
            "name": "twin",
            "variants": [{"name": "a", "model": "m", "replicas": 2}, {"name": "b", "model": "n"}],
        }
    )
    endpoint = Endpoint.new(config)
    assert endpoint.status is EndpointStatus.CREATING
    assert [(v.name, v.desired_replicas, v.current_replicas) for v in endpoint.variants] == [
        ("a", 2, 0),
        ("b", 1, 0),
    ]
    with pytest.raises(ValidationError, match="carries the config"):
        Endpoint(name="other", config=config)


# --- async endpoints ---


def _async_cfg(**extra: object) -> dict[str, object]:
    return {"name": "twin", "variants": [{"model": "/m"}], "async": {}, **extra}


def test_async_block_in_yaml_round_trips_with_its_secret_masked_unless_revealed() -> None:
    from twinserve.deploy.spec import EndpointConfig

    cfg = EndpointConfig.from_yaml(
        "name: twin\nvariants: [{model: /m}]\n"
        "async:\n  max_concurrent_invocations_per_replica: 3\n  notify_success_url: http://127.0.0.1:9/hook\n"
        "  notify_secret: s3cret\n"
    )
    assert cfg.async_inference is not None and cfg.async_inference.max_concurrent_invocations_per_replica == 3
    shown = cfg.to_dict()
    assert shown["async"]["notify_secret"] == "**********" and "s3cret" not in cfg.to_yaml()
    assert cfg.to_dict(reveal_secrets=True)["async"]["notify_secret"] == "s3cret"
    again = EndpointConfig.from_dict(cfg.to_dict(reveal_secrets=True))
    assert again.async_inference == cfg.async_inference
    with pytest.raises(ValueError, match="masked"):
        EndpointConfig.from_dict(shown)


def test_scale_to_zero_and_backlog_scaling_need_an_async_endpoint() -> None:
    from twinserve.deploy.spec import EndpointConfig

    zero = {"type": "target_tracking", "target": 4, "min_replicas": 0, "max_replicas": 2}
    with pytest.raises(ValueError, match="scale to zero needs a queue"):
        EndpointConfig.model_validate({"name": "twin", "variants": [{"model": "/m"}], "autoscaling": zero})
    backlog = {**zero, "min_replicas": 1, "metric": "backlog_per_replica"}
    with pytest.raises(ValueError, match="needs an async endpoint"):
        EndpointConfig.model_validate({"name": "twin", "variants": [{"model": "/m"}], "autoscaling": backlog})
    cfg = EndpointConfig.model_validate(_async_cfg(autoscaling={**zero, "metric": "backlog_per_replica"}))
    assert cfg.autoscaling is not None and cfg.autoscaling.min_replicas == 0
    assert cfg.variants[0].replicas == 1  # it starts with one replica, then scales in when idle


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"output_location": "ftp://x/y"}, "results location"),
        ({"notify_error_url": "file:///tmp/hook"}, "http:// or https://"),
        ({"notify_secret": "k"}, "no webhook"),
        ({"request_ttl_s": 7 * 3600}, "less than or equal"),
        ({"max_concurrent_invocations_per_replica": 0}, "greater than or equal"),
    ],
)
def test_bad_async_settings_are_refused_with_the_reason(block: dict[str, object], message: str) -> None:
    from twinserve.deploy.spec import EndpointConfig

    with pytest.raises(ValueError, match=message):
        EndpointConfig.model_validate(_async_cfg(**{"async": block}))


def test_an_async_endpoint_has_one_variant() -> None:
    from twinserve.deploy.spec import EndpointConfig

    with pytest.raises(ValueError, match="exactly one variant"):
        EndpointConfig.model_validate(
            {"name": "twin", "variants": [{"model": "/m"}, {"name": "b", "model": "/m"}], "async": {}}
        )
