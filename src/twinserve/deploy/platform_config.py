"""Where an endpoint runs (`platform:` in the YAML), with each platform's own settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PlatformName = Literal["local", "sagemaker", "ray"]
_SAGEMAKER_ARN = r"^arn:aws[a-z-]*:"


class SageMakerSettings(BaseModel):
    """Where and how the `sagemaker` platform deploys (the Hugging Face LLM DLC, i.e. TGI's image).

    None fields are filled at deploy time: the region and account from boto3's usual chain, the
    instance type and TGI limits from `twinserve plan`, the image from the DLC table.
    """

    model_config = ConfigDict(extra="forbid")

    region: str | None = Field(None, description="AWS region; None = boto3's (AWS_REGION, ~/.aws/config).")
    role_arn: str | None = Field(
        None,
        pattern=_SAGEMAKER_ARN,
        description="Execution role SageMaker assumes; None = $SAGEMAKER_ROLE_ARN (required at create).",
    )
    instance_type: str | None = Field(
        None,
        pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$",
        description="e.g. ml.g5.2xlarge; None = the planner's pick.",
    )
    image: str | None = Field(None, min_length=1, description="Container image URI; None = the HF LLM DLC.")
    tgi_version: str | None = Field(None, description="DLC TGI version; None = the pinned default.")
    hf_token_secret: str | None = Field(
        None,
        pattern=_SAGEMAKER_ARN,
        description="Secrets Manager ARN holding a Hub token (gated models); never stored or printed.",
    )
    model_data_bucket: str | None = Field(
        None, min_length=3, description="S3 bucket for uploaded weights; None = sagemaker-{region}-{account}."
    )
    model_data_prefix: str = Field("twinserve/models", description="Key prefix under the bucket.")
    messages_api: bool = Field(
        True, description="MESSAGES_API_ENABLED: the OpenAI chat route on /invocations."
    )
    startup_health_check_timeout_s: int | None = Field(
        None,
        ge=60,
        le=3600,
        description="ContainerStartupHealthCheckTimeoutInSeconds; None = sized to the model.",
    )
    model_data_download_timeout_s: int | None = Field(
        None, ge=60, le=3600, description="ModelDataDownloadTimeoutInSeconds; None = sized to the model."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Tags on every resource created.")
    mode: Literal["realtime", "async"] = Field(
        "realtime",
        description="Kept for YAML that sets it: the endpoint's `async:` block is what makes it async "
        "(InvokeEndpointAsync); `async` here without that block is refused.",
    )
    model_source: Literal["auto", "s3"] = Field(
        "auto",
        description=(
            "auto: Hub models (and registry versions imported from the Hub) load from the Hub in the "
            "container, others from S3; s3: registry versions always from S3 (endpoints without internet)."
        ),
    )
    termination_wait_s: int = Field(
        0, ge=0, le=3600, description="Update: TerminationWaitInSeconds, the old fleet kept after the shift."
    )
    max_execution_timeout_s: int | None = Field(
        None, ge=600, le=28800, description="Update: MaximumExecutionTimeoutInSeconds; None = sized."
    )
    rollback_5xx_errors: int = Field(
        1, ge=1, description="Update: Invocation5XXErrors in one minute that roll the update back."
    )
    rollback_latency_s: float = Field(
        30.0, gt=0, description="Update: average ModelLatency over one minute that rolls the update back."
    )


class RaySettings(BaseModel):
    """Which Ray cluster runs the endpoint as a Serve application, and what each replica reserves.

    A replica's resources default to the variant's: `threads` CPUs (1 when unset) and one GPU for
    `device: cuda`; `num_cpus`/`num_gpus` override them (fractions allowed, as Ray schedules them).
    """

    model_config = ConfigDict(extra="forbid")

    address: str = Field(
        "auto",
        min_length=1,
        description="auto (the cluster `ray start` runs on this machine), HOST:PORT (its GCS) or "
        "ray://HOST:10001 (Ray Client).",
    )
    http_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Where Serve's HTTP proxy listens when twinserve starts Serve (0.0.0.0 on a "
        "multi-node cluster); an already running Serve keeps its own.",
    )
    http_port: int = Field(8000, ge=1, le=65535, description="The proxy's port when twinserve starts Serve.")
    public_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Base URL clients reach the proxy at (a load balancer in front of every node's "
        "proxy); None = http://<proxy host>:<port>. The endpoint is at <base>/<name>.",
    )
    num_cpus: float | None = Field(None, gt=0, description="CPUs each replica reserves; None = threads or 1.")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs each replica reserves; None = 1 for device cuda, else 0."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Serve sends one replica at once (the engine batches them); None = the "
        "variant's max_concurrent_requests, else 128.",
    )
    max_constructor_retries: int = Field(
        3,
        ge=1,
        le=100,
        description="Serve's max_constructor_retry_count: replica starts (model loads) that may fail "
        "before the deployment fails, and an update rolls back.",
    )


class PlatformConfig(BaseModel):
    """Which platform runs the endpoint, with that platform's settings (`platform:` in the YAML)."""

    model_config = ConfigDict(extra="forbid")

    type: PlatformName = Field(
        "local", description="local (processes on this machine) | sagemaker | ray (a Serve application)."
    )
    sagemaker: SageMakerSettings | None = Field(None, description="Only with type: sagemaker.")
    ray: RaySettings | None = Field(None, description="Only with type: ray.")

    @model_validator(mode="after")
    def _settings_match(self) -> PlatformConfig:
        if self.sagemaker is not None and self.type != "sagemaker":
            raise ValueError(f"platform.sagemaker is set but platform.type is {self.type!r}")
        if self.ray is not None and self.type != "ray":
            raise ValueError(f"platform.ray is set but platform.type is {self.type!r}")
        if self.type == "sagemaker" and self.sagemaker is None:
            self.sagemaker = SageMakerSettings()
        if self.type == "ray" and self.ray is None:
            self.ray = RaySettings()
        return self
