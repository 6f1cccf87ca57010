"""Removing what an endpoint owns on AWS, in the order AWS allows, tolerating "already gone".

```
scaling policies and scalable targets  (a target pins the variant; policies first)
alarms                                 (step-scaling triggers, the update's rollback alarms)
endpoint                               (and wait until it is gone: its config is in use until then)
endpoint configs                       (recorded ones and the one the endpoint actually ran)
models                                 (recorded ones and those the configs name)
```
Every step runs even when an earlier one failed (a throttled alarm delete must not leave a
running endpoint); the failures are reported together, and the state is kept so a second
`delete` finishes the job. S3 model data is left: it is a content-addressed cache shared by
every endpoint and re-deploy of the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twinserve.deploy.spec import Endpoint
from twinserve.errors import TwinserveError
from twinserve.platforms.sagemaker import autoscaling, resources, steps
from twinserve.platforms.sagemaker.clients import Region, aws_step, tolerate_gone

Progress = Callable[[str], None]
DELETE_TIMEOUT_S = 1800.0


def delete_generation(
    region: Region, models: Iterable[str], configs: Iterable[str], progress: Progress
) -> list[TwinserveError]:
    """Delete endpoint configs, then models; returns the failures (empty: all gone)."""
    failures: list[TwinserveError] = []
    for name in configs:
        _try(failures, _delete, region, "delete_endpoint_config", name, progress)
    for name in models:
        _try(failures, _delete, region, "delete_model", name, progress)
    return failures


def teardown(
    region: Region, endpoint: Endpoint, *, poll_s: float, progress: Progress
) -> list[TwinserveError]:
    """Remove everything `endpoint` owns; the failures (empty: nothing is left)."""
    res = endpoint.resources
    name = res.get("endpoint", endpoint.name)
    failures: list[TwinserveError] = []
    variants = {v.name for v in endpoint.config.variants} | {
        v.name for v in (endpoint.target.variants if endpoint.target else [])
    }
    _try(failures, lambda: autoscaling.remove_variants(region, name, sorted(variants), progress))
    scaled = [c for c in (endpoint.config, endpoint.target) if c is not None]
    alarm_names = set(resources.alarms(res))
    for config in scaled:
        alarm_names |= autoscaling.parts(config)[1]
    _try(failures, lambda: autoscaling.delete_alarms(region, alarm_names))
    configs = resources.configs(res)
    models = resources.models(res)
    _try(failures, lambda: _live(region, name, configs, models))
    _try(failures, lambda: _delete_endpoint(region, name, poll_s, progress))
    failures += delete_generation(region, dict.fromkeys(models), dict.fromkeys(configs), progress)
    return failures


def _live(region: Region, name: str, configs: list[str], models: list[str]) -> None:
    """Add the config the endpoint runs and the models of every config to the lists."""
    reply = steps.describe_endpoint(region, name)
    if reply is not None and reply.get("EndpointConfigName") and reply["EndpointConfigName"] not in configs:
        configs.append(reply["EndpointConfigName"])
    for config in list(configs):
        described = _describe_config(region, config)
        for variant in (described or {}).get("ProductionVariants", []):
            if variant.get("ModelName") and variant["ModelName"] not in models:
                models.append(variant["ModelName"])


def _describe_config(region: Region, name: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    from twinserve.platforms.sagemaker.clients import is_gone

    with aws_step(f"describe_endpoint_config {name}"):
        try:
            return dict(region.sagemaker.describe_endpoint_config(EndpointConfigName=name))
        except ClientError as exc:
            if is_gone(exc):
                return None
            raise


def _delete_endpoint(region: Region, name: str, poll_s: float, progress: Progress) -> None:
    if tolerate_gone(f"delete_endpoint {name}", region.sagemaker.delete_endpoint, EndpointName=name):
        progress(f"endpoint {name} is Deleting")
        steps.wait_gone(region, name, timeout_s=DELETE_TIMEOUT_S, poll_s=poll_s)
        progress(f"endpoint {name} deleted")


def _delete(region: Region, operation: str, name: str, progress: Progress) -> None:
    key = "EndpointConfigName" if operation == "delete_endpoint_config" else "ModelName"
    if tolerate_gone(f"{operation} {name}", getattr(region.sagemaker, operation), **{key: name}):
        progress(f"{operation.removeprefix('delete_').replace('_', ' ')} {name} deleted")


def _try(failures: list[TwinserveError], step: Callable[..., object], *args: Any) -> None:
    try:
        step(*args)
    except TwinserveError as exc:
        failures.append(exc)
