"""The AWS steps of a deployment: token, models, endpoint config, endpoint, waiting, logs.

Each step is one boto3 call through `aws_step`, so a failure names it; the caller records a
resource's name in the state store before the step that creates it, so whatever a crash
leaves behind is found and removed by `delete`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from twinserve.errors import ModelLoadError, NotFoundError, ValidationError
from twinserve.platforms.sagemaker.clients import Region, aws_step, is_gone, redact
from twinserve.platforms.sagemaker.images import log_group
from twinserve.platforms.sagemaker.prepare import Generation, VariantDeployment

Progress = Callable[[str], None]
SETTLING = frozenset({"Creating", "Updating", "SystemUpdating", "RollingBack"})
_TOKEN_KEYS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "token", "hf_token")


def read_token(region: Region, arn: str | None) -> str | None:
    """The Hub token in Secrets Manager secret `arn` (a plain string, or JSON with HF_TOKEN)."""
    if arn is None:
        return None
    secret_region = arn.split(":")[3]
    client = region.clients.client("secretsmanager", secret_region)
    with aws_step(f"secretsmanager.get_secret_value {arn}"):
        reply = client.get_secret_value(SecretId=arn)
    value = reply.get("SecretString")
    if value is None and reply.get("SecretBinary") is not None:
        value = bytes(reply["SecretBinary"]).decode("utf-8", "replace")
    value = (value or "").strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            data = {}
        value = next((str(data[k]).strip() for k in _TOKEN_KEYS if isinstance(data, dict) and k in data), "")
    if not value:
        raise ValidationError(
            f"secret {arn} holds no Hub token (a plain string, or JSON with an HF_TOKEN key)",
            param="platform.sagemaker.hf_token_secret",
        )
    return value


def create_model(region: Region, gen: Generation, v: VariantDeployment, token: str | None) -> None:
    """CreateModel: the image, its env (the token only here), the S3 prefix of the weights."""
    env = dict(v.env)
    if token:
        env["HUGGING_FACE_HUB_TOKEN"] = token
        env["HF_TOKEN"] = token
    container: dict[str, Any] = {"Image": gen.image, "Environment": env}
    if v.model_data is not None:
        container["ModelDataSource"] = v.model_data.model_data_source()
    with aws_step(f"create_model {v.model_name}", secrets=(token,) if token else ()):
        region.sagemaker.create_model(
            ModelName=v.model_name, ExecutionRoleArn=gen.role_arn, PrimaryContainer=container, Tags=gen.tags()
        )


def production_variants(gen: Generation) -> list[dict[str, Any]]:
    return [
        {
            "VariantName": v.variant,
            "ModelName": v.model_name,
            "InstanceType": v.instance_type,
            "InitialInstanceCount": v.initial_count,
            "InitialVariantWeight": float(v.weight),
            "ModelDataDownloadTimeoutInSeconds": v.sizing.download_timeout_s,
            "ContainerStartupHealthCheckTimeoutInSeconds": v.sizing.startup_timeout_s,
        }
        for v in gen.variants
    ]


def create_endpoint_config(region: Region, gen: Generation) -> None:
    """CreateEndpointConfig: the variants, and for an async endpoint its AsyncInferenceConfig."""
    params: dict[str, Any] = {
        "EndpointConfigName": gen.config_name,
        "ProductionVariants": production_variants(gen),
        "Tags": gen.tags(),
    }
    if gen.async_inference is not None:
        params["AsyncInferenceConfig"] = gen.async_inference
    with aws_step(f"create_endpoint_config {gen.config_name}"):
        region.sagemaker.create_endpoint_config(**params)


def create_endpoint(region: Region, gen: Generation) -> None:
    with aws_step(f"create_endpoint {gen.endpoint}"):
        region.sagemaker.create_endpoint(
            EndpointName=gen.endpoint, EndpointConfigName=gen.config_name, Tags=gen.tags()
        )


def describe_endpoint(region: Region, name: str) -> dict[str, Any] | None:
    """DescribeEndpoint's reply; None when there is no such endpoint."""
    from botocore.exceptions import ClientError

    with aws_step(f"describe_endpoint {name}"):
        try:
            return dict(region.sagemaker.describe_endpoint(EndpointName=name))
        except ClientError as exc:
            if is_gone(exc):
                return None
            raise


def wait_endpoint(
    region: Region, name: str, *, timeout_s: float, poll_s: float, progress: Progress
) -> dict[str, Any]:
    """Poll DescribeEndpoint until the status settles (InService, Failed …); its last reply.

    ModelLoadError after `timeout_s`; NotFoundError if the endpoint disappears meanwhile.
    """
    start = time.monotonic()
    last = None
    while True:
        reply = describe_endpoint(region, name)
        if reply is None:
            raise NotFoundError(f"SageMaker endpoint {name} disappeared while waiting for it")
        status = reply["EndpointStatus"]
        elapsed = time.monotonic() - start
        if status != last:
            progress(f"endpoint {name} is {status} ({elapsed:.0f}s)")
            last = status
        if status not in SETTLING:
            return reply
        if elapsed > timeout_s:
            raise ModelLoadError(f"endpoint {name} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def wait_gone(region: Region, name: str, *, timeout_s: float, poll_s: float) -> None:
    start = time.monotonic()
    while describe_endpoint(region, name) is not None:
        if time.monotonic() - start > timeout_s:
            raise ModelLoadError(f"endpoint {name} still exists {timeout_s:.0f}s after delete_endpoint")
        time.sleep(poll_s)


def endpoint_logs(
    region: Region, name: str, lines: int = 50, *, secrets: tuple[str, ...] = ()
) -> dict[str, str]:
    """The last `lines` of each CloudWatch log stream of the endpoint (newest streams first)."""
    from botocore.exceptions import ClientError

    group = log_group(name)
    try:
        with aws_step(f"logs.describe_log_streams {group}"):
            streams = region.logs.describe_log_streams(
                logGroupName=group, orderBy="LastEventTime", descending=True, limit=20
            ).get("logStreams", [])
    except NotFoundError:
        return {}
    out: dict[str, str] = {}
    for stream in streams:
        stream_name = stream["logStreamName"]
        try:
            events = region.logs.get_log_events(
                logGroupName=group, logStreamName=stream_name, limit=lines, startFromHead=False
            ).get("events", [])
        except ClientError:
            continue
        text = "\n".join(e.get("message", "").rstrip("\n") for e in events[-lines:])
        out[stream_name] = redact(text, secrets)
    return out


def failure_report(
    region: Region, reply: dict[str, Any], *, lines: int = 20, secrets: tuple[str, ...] = ()
) -> str:
    """SageMaker's FailureReason and the last log lines of each stream, for an error and the state."""
    name = reply.get("EndpointName", "")
    reason = redact(str(reply.get("FailureReason") or f"status {reply.get('EndpointStatus')}"), secrets)
    try:
        logs = endpoint_logs(region, name, lines, secrets=secrets)
    except Exception as exc:  # the report must not hide the failure it reports
        logs = {"(logs)": f"could not be read: {redact(str(exc), secrets)}"}
    parts = [reason]
    for stream, text in logs.items():
        if text:
            parts.append(f"--- {log_group(name)} {stream} (last {lines} lines)\n{text}")
    return "\n".join(parts)
