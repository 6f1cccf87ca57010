"""An asynchronous endpoint's settings (`async:` in the endpoint YAML, `endpoint create --async`).

The names follow SageMaker's `AsyncInferenceConfig` (ClientConfig.MaxConcurrentInvocationsPerInstance,
OutputConfig.S3OutputPath / S3FailurePath / NotificationConfig) so that one YAML deploys locally
(our queue, workers and webhooks) and on SageMaker (its own async machinery). Notifications differ:
locally they are webhooks (notify_*_url), on SageMaker SNS topics (*_topic_arn); each platform
uses its own pair (SageMaker refuses webhooks, the local platform ignores topics).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

# SageMaker's bounds: RequestTTLSeconds ≤ 6 h, InvocationTimeoutSeconds ≤ 1 h
MAX_TTL_S = 6 * 3600.0
MAX_INVOCATION_TIMEOUT_S = 3600.0
_LOCATION_SCHEMES = ("file://", "s3://", "/")
# SageMaker's NotificationConfig pattern (SuccessTopic / ErrorTopic), with a region required
_SNS_TOPIC_ARN = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_.-]{1,256}$")


class AsyncInferenceConfig(BaseModel):
    """How an endpoint takes requests through a durable queue instead of answering them at once."""

    model_config = ConfigDict(extra="forbid")

    max_concurrent_invocations_per_replica: int = Field(
        8,
        ge=1,
        le=1000,
        description="Jobs one replica runs at once (SageMaker's MaxConcurrentInvocationsPerInstance); "
        "the workers lease at most this many per healthy replica.",
    )
    output_location: str | None = Field(
        None,
        description="Where answers go: file:///dir, /dir or s3://bucket/prefix (S3OutputPath). "
        "None = `results/` in the endpoint's folder.",
    )
    failure_location: str | None = Field(
        None, description="Where error bodies go (S3FailurePath); None = `failures/` under output_location."
    )
    input_roots: list[str] = Field(
        default_factory=list,
        description="Folders `X-Input-Location: file://…` may read from (besides the endpoint's "
        "`inputs/` folder); s3:// inputs are read with the workers' AWS credentials.",
    )
    notify_success_url: str | None = Field(
        None,
        description="Webhook POSTed when a job succeeds (local platform; SageMaker refuses webhooks: "
        "use success_topic_arn there).",
    )
    notify_error_url: str | None = Field(
        None,
        description="Webhook POSTed when a job fails or expires (local platform; on SageMaker use "
        "error_topic_arn).",
    )
    success_topic_arn: str | None = Field(
        None,
        description="SageMaker only: SNS topic told when a job succeeds (NotificationConfig.SuccessTopic), "
        "arn:aws:sns:REGION:ACCOUNT:NAME. The local platform ignores it (it notifies by webhook).",
    )
    error_topic_arn: str | None = Field(
        None,
        description="SageMaker only: SNS topic told when a job fails (NotificationConfig.ErrorTopic). "
        "The local platform ignores it.",
    )
    notify_secret: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key that signs each webhook (X-Twinserve-Signature); never logged or shown.",
    )
    request_ttl_s: float = Field(
        MAX_TTL_S,
        gt=0,
        le=MAX_TTL_S,
        description="A job no worker started within this many seconds expires (RequestTTLSeconds).",
    )
    invocation_timeout_s: float = Field(
        900.0,
        gt=0,
        le=MAX_INVOCATION_TIMEOUT_S,
        description="How long one attempt may run (InvocationTimeoutSeconds); then it is retried or failed.",
    )
    max_attempts: int = Field(3, ge=1, le=10, description="Deliveries of a job before it fails for good.")
    lease_timeout_s: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="A worker's hold on a running job without a heartbeat (the queue's visibility "
        "timeout): the jobs of a worker that died are delivered again after this.",
    )
    queue_url: str | None = Field(
        None,
        description="sqlite:///PATH or redis://HOST:PORT/DB; None = $TWINSERVE_QUEUE_URL at create, "
        "else SQLite next to the endpoint state.",
    )

    @field_validator("notify_secret", mode="before")
    @classmethod
    def _not_masked(cls, v: object) -> object:
        if v == "**********":
            raise ValueError("async.notify_secret is masked (**********); give the secret itself")
        if isinstance(v, str) and not v.strip():
            raise ValueError("async.notify_secret is set but empty; leave it out for unsigned webhooks")
        return v

    @field_validator("output_location", "failure_location")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(_LOCATION_SCHEMES):
            raise ValueError(f"a results location is file:///dir, /dir or s3://bucket/prefix, not {v!r}")
        return v

    @field_validator("notify_success_url", "notify_error_url")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"a webhook is an http:// or https:// URL, not {v!r}")
        return v

    @field_validator("success_topic_arn", "error_topic_arn")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        if v is not None and not _SNS_TOPIC_ARN.fullmatch(v):
            raise ValueError(f"an SNS topic is arn:aws:sns:REGION:ACCOUNT:NAME, not {v!r}")
        return v

    @model_validator(mode="after")
    def _secret_needs_url(self) -> AsyncInferenceConfig:
        if self.notify_secret is not None and not (self.notify_success_url or self.notify_error_url):
            raise ValueError("notify_secret is set but no webhook is (notify_success_url, notify_error_url)")
        return self
