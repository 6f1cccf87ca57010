"""What an endpoint owns on AWS, as `Endpoint.resources` records it (flat `str → str`).

```
region, account, image, log_group, hf_token_secret (the ARN only, never the token)
endpoint                       the SageMaker endpoint
endpoint_config                the serving generation's endpoint config
model.<variant>                its SageMaker model per variant
instance_type.<variant>, model_data.<variant> (s3://… or hf://repo@sha), pinned.<variant>
async.output_path, async.failure_path, async.max_concurrent_invocations_per_instance,
async.success_topic, async.error_topic   an async endpoint's AsyncInferenceConfig
target.endpoint_config, target.model.<variant> …   the same for an update in flight
alarms                         CloudWatch alarms twinserve created (comma-separated)
```
Names are written before the call that creates the thing, so `delete` after a crash finds
everything that may exist; it tolerates what never came to be.
"""

from __future__ import annotations

from twinserve.platforms.sagemaker import async_inference
from twinserve.platforms.sagemaker.prepare import Generation

TARGET = "target."


def generation_resources(gen: Generation, *, target: bool = False) -> dict[str, str]:
    """The keys of one generation's resources (under `target.` for an update in flight)."""
    prefix = TARGET if target else ""
    out = {f"{prefix}endpoint_config": gen.config_name, f"{prefix}image": gen.image}
    for v in gen.variants:
        out[f"{prefix}model.{v.variant}"] = v.model_name
        out[f"{prefix}instance_type.{v.variant}"] = v.instance_type
        out[f"{prefix}model_data.{v.variant}"] = v.source_label
        out[f"{prefix}pinned.{v.variant}"] = v.pinned.label
    out.update(async_inference.resources(gen.async_inference, prefix=prefix))
    return out


def without_generation(resources: dict[str, str], *, target: bool) -> dict[str, str]:
    """`resources` less one generation's keys (the serving one, or the target's)."""
    keys = ("endpoint_config", "image", "model.", "instance_type.", "model_data.", "pinned.", "async.")
    if target:
        return {k: v for k, v in resources.items() if not k.startswith(TARGET)}
    return {k: v for k, v in resources.items() if k.startswith(TARGET) or not k.startswith(keys)}


def promote_target(resources: dict[str, str]) -> dict[str, str]:
    """After a successful update: the target's keys become the serving generation's."""
    kept = without_generation(resources, target=False)
    return {(k.removeprefix(TARGET) if k.startswith(TARGET) else k): v for k, v in kept.items()}


def models(resources: dict[str, str], *, target: bool | None = None) -> list[str]:
    """Model names recorded (serving, target, or both when `target` is None)."""
    out = []
    for key, value in resources.items():
        is_target = key.startswith(TARGET)
        if key.removeprefix(TARGET).startswith("model.") and (target is None or target == is_target):
            out.append(value)
    return out


def configs(resources: dict[str, str], *, target: bool | None = None) -> list[str]:
    out = []
    if target in (None, False) and "endpoint_config" in resources:
        out.append(resources["endpoint_config"])
    if target in (None, True) and f"{TARGET}endpoint_config" in resources:
        out.append(resources[f"{TARGET}endpoint_config"])
    return out


def alarms(resources: dict[str, str]) -> list[str]:
    return [a for a in resources.get("alarms", "").split(",") if a]


def with_alarms(resources: dict[str, str], names: list[str]) -> dict[str, str]:
    return {**resources, "alarms": ",".join(sorted({*alarms(resources), *names}))}
