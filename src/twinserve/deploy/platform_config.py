"""Where an endpoint runs (`platform:` in the YAML), with each platform's own settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PlatformName = Literal["local", "sagemaker"]
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


class PlatformConfig(BaseModel):
    """Which platform runs the endpoint, with that platform's settings (`platform:` in the YAML)."""

    model_config = ConfigDict(extra="forbid")

    type: PlatformName = Field("local", description="local (processes on this machine) | sagemaker.")
    sagemaker: SageMakerSettings | None = Field(None, description="Only with type: sagemaker.")

    @model_validator(mode="after")
    def _settings_match(self) -> PlatformConfig:
        if self.sagemaker is not None and self.type != "sagemaker":
            raise ValueError(f"platform.sagemaker is set but platform.type is {self.type!r}")
        if self.type == "sagemaker" and self.sagemaker is None:
            self.sagemaker = SageMakerSettings()
        return self
