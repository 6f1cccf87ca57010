"""An endpoint's config in Serve's terms: deployment options, autoscaling_config, replica flags.

| twinserve                                   | Ray Serve                                  |
|---------------------------------------------|--------------------------------------------|
| variant `threads` / `device: cuda`          | `ray_actor_options` num_cpus / num_gpus    |
| `limits.max_concurrent_requests`            | `max_ongoing_requests` (else 128)          |
| target tracking on concurrent requests      | `autoscaling_config.target_ongoing_requests` |
| `min_replicas` / `max_replicas`             | the same (min 0: scale to zero)            |
| `scale_out_cooldown_s` / `scale_in_cooldown_s` | `upscale_delay_s` / `downscale_delay_s` |
| `lookback_s`                                | `look_back_period_s`                       |
| `drain_timeout_s`                           | `graceful_shutdown_timeout_s`              |
| blue/green                                  | a surge rollout (`max_surge_percent` 100): new replicas start before old ones stop |

Serve's delays are how long a decision must hold before it acts, where our cooldowns are the
wait after an action; both keep a burst from flapping the replica count. What Serve cannot do
(step scaling, invocation-rate targets, scale-in disabled) is refused at create, not approximated.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from twinserve import __version__
from twinserve.deploy.platform_config import RaySettings
from twinserve.deploy.policies import AutoscalingPolicy, TargetTrackingPolicy
from twinserve.deploy.spec import EndpointConfig, VariantConfig
from twinserve.errors import ValidationError

DEFAULT_MAX_ONGOING_REQUESTS = 128


def check_supported(config: EndpointConfig) -> None:
    """Refuse what the ray platform does not run, naming the setting (before anything deploys)."""
    if len(config.variants) != 1:
        raise ValidationError(
            "the ray platform serves one variant per endpoint (Serve rolls it in place); weighted "
            "variants run on the local or sagemaker platform",
            param="variants",
        )
    if config.async_inference is not None:
        raise ValidationError(
            "async endpoints run on the local or sagemaker platform; on Ray use a real-time endpoint "
            "(it scales to zero with autoscaling.min_replicas: 0) or `twinserve batch --platform ray`",
            param="async",
        )
    if config.autoscaling is not None:
        autoscaling_config(config.autoscaling, config.variants[0].replicas)


def autoscaling_config(policy: AutoscalingPolicy, initial: int) -> dict[str, Any]:
    """Serve's autoscaling_config for our policy; ValidationError for what it cannot express."""
    if not isinstance(policy, TargetTrackingPolicy):
        raise ValidationError(
            "Ray Serve autoscales by target tracking only; use type: target_tracking", param="autoscaling"
        )
    if policy.metric != "concurrent_requests_per_replica":
        raise ValidationError(
            f"Ray Serve autoscales on ongoing requests per replica, not {policy.metric}; use "
            "metric: concurrent_requests_per_replica",
            param="autoscaling.metric",
        )
    if policy.disable_scale_in:
        raise ValidationError("Ray Serve always scales in; remove disable_scale_in", param="autoscaling")
    return {
        "min_replicas": policy.min_replicas,
        "max_replicas": policy.max_replicas,
        "initial_replicas": min(max(initial, policy.min_replicas), policy.max_replicas),
        "target_ongoing_requests": policy.target,
        "upscale_delay_s": policy.scale_out_cooldown_s,
        "downscale_delay_s": policy.scale_in_cooldown_s,
        "look_back_period_s": policy.lookback_s,
    }


def replica_resources(variant: VariantConfig, settings: RaySettings) -> tuple[float, float]:
    """(num_cpus, num_gpus) one replica reserves."""
    cpus = settings.num_cpus if settings.num_cpus is not None else float(variant.threads or 1)
    gpus = settings.num_gpus if settings.num_gpus is not None else (1.0 if variant.device == "cuda" else 0.0)
    return cpus, gpus


def serve_flags(config: EndpointConfig, variant: VariantConfig, settings: RaySettings) -> dict[str, Any]:
    """`ServeConfig` fields of one replica: what `twinserve serve` gets as flags locally."""
    cpus, _ = replica_resources(variant, settings)
    flags: dict[str, Any] = {
        "model": variant.load_ref,
        "dtype": variant.dtype,
        "log_format": "json",
        "drain_timeout_s": config.drain_timeout_s,
        "payload_limit": config.payload_limit,
        "num_threads": variant.threads or max(1, math.ceil(cpus)),
        # Serve's proxy stops routing to a replica before it stops it: no port to keep open
        "drain_grace_s": 0.0,
        **variant.limits.model_dump(exclude_none=True),
    }
    if variant.quantize:
        flags["quantize"] = variant.quantize
    if config.api_key is not None:
        flags["api_key"] = config.api_key.get_secret_value()
    return flags


def max_ongoing_requests(variant: VariantConfig, settings: RaySettings) -> int:
    return (
        settings.max_ongoing_requests
        or variant.limits.max_concurrent_requests
        or DEFAULT_MAX_ONGOING_REQUESTS
    )


def deployment_options(config: EndpointConfig, replicas: int, settings: RaySettings) -> dict[str, Any]:
    """`Deployment.options(...)` of the endpoint's one variant at `replicas` (or its autoscaling)."""
    variant = config.variants[0]
    cpus, gpus = replica_resources(variant, settings)
    ongoing = max_ongoing_requests(variant, settings)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "max_ongoing_requests": ongoing,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "max_surge_percent": 100,
        # a model that cannot load does not load on a 4th try: fail (and roll back) in seconds
        "max_constructor_retry_count": settings.max_constructor_retries,
    }
    if config.autoscaling is not None:
        scaling = autoscaling_config(config.autoscaling, replicas)
        if scaling["target_ongoing_requests"] > ongoing:
            raise ValidationError(
                f"autoscaling.target ({scaling['target_ongoing_requests']:g}) exceeds the requests a "
                f"replica takes at once ({ongoing}); raise max_concurrent_requests or lower the target",
                param="autoscaling.target",
            )
        options["autoscaling_config"] = scaling
    else:
        options["num_replicas"] = replicas
    return options


def code_version(config: EndpointConfig, generation: int, settings: RaySettings) -> str:
    """What a replica runs: the same for a scale or an autoscaling change (Serve resizes in place),
    new for each generation (an update, even to the same model) and for new resources. The API key
    stays out (Serve shows versions); a new key comes with an update, hence a new generation."""
    variant = config.variants[0]
    flags = {k: v for k, v in serve_flags(config, variant, settings).items() if k != "api_key"}
    key = {"twinserve": __version__, "flags": flags, "resources": replica_resources(variant, settings)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"g{generation}-{digest}"
