"""An async endpoint's `async:` block as SageMaker's `AsyncInferenceConfig`, checked before anything is created.

```
async: (deploy/async_config.py)          CreateEndpointConfig(AsyncInferenceConfig=…)
max_concurrent_invocations_per_replica ─► ClientConfig.MaxConcurrentInvocationsPerInstance
output_location   (s3://, required)    ─► OutputConfig.S3OutputPath
failure_location  (s3://)              ─► OutputConfig.S3FailurePath   (None: {output_location}/failures,
                                           where the local platform puts them too)
success_topic_arn / error_topic_arn    ─► OutputConfig.NotificationConfig.SuccessTopic / ErrorTopic
notify_success_url / notify_error_url  ─► refused: SageMaker notifies through SNS topics only
request_ttl_s / invocation_timeout_s   ─► not endpoint settings: InvokeEndpointAsync's RequestTTLSeconds
                                          and InvocationTimeoutSeconds, given with each request
queue_url, input_roots, max_attempts   ─► ignored: SageMaker runs its own queue and reads each
                                          request's InputLocation from S3 itself
```
Everything here is pure: `prepare` calls it, so a local path or a webhook fails before any AWS
call. The platform keeps SageMaker's names in `Endpoint.resources` (`async.*`) for `describe`.
"""

from __future__ import annotations

from typing import Any

from twinserve.deploy.async_config import AsyncInferenceConfig
from twinserve.deploy.spec import EndpointConfig
from twinserve.errors import ValidationError
from twinserve.platforms.sagemaker.names import check_s3_uri

_PARAM = "async"


def endpoint_config_params(config: EndpointConfig) -> dict[str, Any] | None:
    """CreateEndpointConfig's `AsyncInferenceConfig` for the config (None: a real-time endpoint).

    ValidationError for what SageMaker cannot do: no or a non-S3 output location, a non-S3
    failure location, webhooks.
    """
    spec = config.async_inference
    if spec is None:
        return None
    _refuse_webhooks(spec)
    if spec.output_location is None:
        raise ValidationError(
            "an async SageMaker endpoint needs async.output_location: s3://BUCKET/PREFIX (where SageMaker "
            "writes the answers; the endpoint's execution role must be allowed to write there)",
            param=f"{_PARAM}.output_location",
        )
    output = check_s3_uri(spec.output_location, f"{_PARAM}.output_location")
    failure = (
        check_s3_uri(spec.failure_location, f"{_PARAM}.failure_location")
        if spec.failure_location is not None
        else f"{output.rstrip('/')}/failures"
    )
    output_config: dict[str, Any] = {"S3OutputPath": output, "S3FailurePath": failure}
    topics = {"SuccessTopic": spec.success_topic_arn, "ErrorTopic": spec.error_topic_arn}
    if any(topics.values()):
        output_config["NotificationConfig"] = {k: v for k, v in topics.items() if v is not None}
    return {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": spec.max_concurrent_invocations_per_replica},
        "OutputConfig": output_config,
    }


def _refuse_webhooks(spec: AsyncInferenceConfig) -> None:
    given = [n for n in ("notify_success_url", "notify_error_url") if getattr(spec, n) is not None]
    if given:
        raise ValidationError(
            f"async.{given[0]}: SageMaker cannot call webhooks; it notifies through Amazon SNS: use "
            "async.success_topic_arn / async.error_topic_arn (arn:aws:sns:REGION:ACCOUNT:TOPIC) instead",
            param=f"{_PARAM}.{given[0]}",
        )


def concurrency_note(variant: str, env: dict[str, str], params: dict[str, Any]) -> str | None:
    """A warning when SageMaker would send an instance more requests than TGI accepts at once."""
    per_instance = int(params["ClientConfig"]["MaxConcurrentInvocationsPerInstance"])
    tgi = env.get("MAX_CONCURRENT_REQUESTS")
    if tgi is None or int(tgi) >= per_instance:
        return None
    return (
        f"variant {variant}: SageMaker sends up to {per_instance} async requests per instance but TGI "
        f"takes {tgi} at once (MAX_CONCURRENT_REQUESTS); the rest fail as overloaded: lower "
        "async.max_concurrent_invocations_per_replica or raise the variant's limits"
    )


def resources(params: dict[str, Any] | None, *, prefix: str = "") -> dict[str, str]:
    """What `describe` shows of the async config, as `Endpoint.resources` keys (`async.*`)."""
    if params is None:
        return {}
    output = params["OutputConfig"]
    topics = output.get("NotificationConfig", {})
    values = {
        "async.output_path": output["S3OutputPath"],
        "async.failure_path": output.get("S3FailurePath"),
        "async.max_concurrent_invocations_per_instance": str(
            params["ClientConfig"]["MaxConcurrentInvocationsPerInstance"]
        ),
        "async.success_topic": topics.get("SuccessTopic"),
        "async.error_topic": topics.get("ErrorTopic"),
    }
    return {f"{prefix}{k}": v for k, v in values.items() if v is not None}
