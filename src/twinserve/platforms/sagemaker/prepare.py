"""Everything a generation needs, decided before any AWS call that creates something.

```
EndpointConfig ─► settings (region, role, image, names) ─► pin each variant ─► where its weights
come from (Hub id + commit, or the registry's files in S3) ─► planner: instance, limits, timeouts
─► container env ─► async: AsyncInferenceConfig ─► Generation (what create/update then create)
```
A bad input (unknown region, no role, a name SageMaker refuses, an instance type it does not
offer, a model too big for it, an async output that is not on S3, a webhook) fails here, so
nothing is ever half-created because of it.
The Hub token is not part of this: it is read from Secrets Manager right before `create_model`
and never leaves the call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from twinserve.deploy.pinning import PinnedModel, pin_model
from twinserve.deploy.platform_config import SageMakerSettings
from twinserve.deploy.spec import EndpointConfig, VariantConfig
from twinserve.errors import NotFoundError, ValidationError
from twinserve.planner.model_shape import ModelSource
from twinserve.platforms.sagemaker import async_inference, images, names
from twinserve.platforms.sagemaker.model_data import ModelData
from twinserve.platforms.sagemaker.sizing import VariantSizing, size_variant
from twinserve.registry.versions import VersionInfo

ROLE_ENV = "SAGEMAKER_ROLE_ARN"
OPT_ML_MODEL = "/opt/ml/model"
_HUB_SHA = 40


class VariantDeployment(BaseModel):
    """One production variant of a generation: its SageMaker model and how it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str = Field(description="Variant name (SageMaker VariantName).")
    model_name: str = Field(description="SageMaker model name of this generation's variant.")
    instance_type: str = Field(description="Instance type.")
    initial_count: int = Field(ge=1, description="InitialInstanceCount.")
    weight: float = Field(ge=0, description="InitialVariantWeight.")
    env: dict[str, str] = Field(description="Container environment, without the Hub token.")
    pinned: PinnedModel = Field(description="The exact model.")
    hub: str | None = Field(None, description="repo@sha the container downloads; None = S3.")
    version: VersionInfo | None = Field(None, description="Registry version uploaded to S3.")
    model_data: ModelData | None = Field(None, description="Its S3 location, once the bucket is known.")
    sizing: VariantSizing = Field(description="Planner's instance, env and timeouts.")

    @property
    def source_label(self) -> str:
        return (
            f"hf://{self.hub}"
            if self.hub
            else (self.model_data.s3_uri if self.model_data else "s3 (pending)")
        )


class Generation(BaseModel):
    """What one config generation creates: a model per variant, an endpoint config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(description="SageMaker endpoint name.")
    number: int = Field(ge=1, description="Generation number.")
    region: str = Field(description="AWS region.")
    role_arn: str = Field(description="Execution role.")
    image: str = Field(description="Container image URI.")
    config_name: str = Field(description="Endpoint config name.")
    config: EndpointConfig = Field(description="The config, pinned, with region and role filled in.")
    variants: list[VariantDeployment] = Field(description="One per variant, in config order.")
    async_inference: dict[str, Any] | None = Field(
        None, description="CreateEndpointConfig's AsyncInferenceConfig; None = a real-time endpoint."
    )

    @property
    def settings(self) -> SageMakerSettings:
        assert self.config.platform.sagemaker is not None
        return self.config.platform.sagemaker

    @property
    def token_secret(self) -> str | None:
        return self.settings.hf_token_secret

    def tags(self) -> list[dict[str, str]]:
        own = {"twinserve:endpoint": self.endpoint, "twinserve:generation": str(self.number)}
        return [{"Key": k, "Value": v} for k, v in {**self.settings.tags, **own}.items()]


def settings_of(config: EndpointConfig) -> SageMakerSettings:
    if config.platform.type != "sagemaker" or config.platform.sagemaker is None:
        raise ValidationError(
            f"endpoint {config.name!r} is for platform {config.platform.type!r}, not sagemaker"
        )
    return config.platform.sagemaker


def resolve_region(settings: SageMakerSettings, default: str | None) -> str:
    region = settings.region or default
    if not region:
        raise ValidationError(
            "no AWS region: give --region (or set AWS_REGION, or a region in `aws configure`)",
            param="platform.sagemaker.region",
        )
    return images.check_region(region)


def prepare(
    config: EndpointConfig,
    number: int,
    *,
    default_region: str | None,
    counts: Mapping[str, int] | None = None,
) -> Generation:
    """Check `config` and decide generation `number`; ValidationError / NotFoundError on bad input.

    `counts` overrides a variant's InitialInstanceCount (an update keeps what autoscaling chose).
    """
    settings = settings_of(config)
    if settings.mode == "async" and config.async_inference is None:
        raise ValidationError(
            "platform.sagemaker.mode: async needs the endpoint's `async:` block (at least "
            "output_location: s3://BUCKET/PREFIX); the `async:` block alone makes an endpoint async",
            param="platform.sagemaker.mode",
        )
    async_params = async_inference.endpoint_config_params(config)
    if config.api_key is not None:
        raise ValidationError(
            "SageMaker endpoints authenticate with AWS IAM (SigV4), not a bearer key: leave api_key out",
            param="api_key",
        )
    region = resolve_region(settings, default_region)
    role = names.check_role(settings.role_arn or os.environ.get(ROLE_ENV))
    image = (
        names.check_image(settings.image)
        if settings.image
        else images.dlc_image(region, settings.tgi_version)
    )
    if settings.hf_token_secret:
        names.check_secret_arn(settings.hf_token_secret)
    if settings.model_data_bucket:
        names.check_bucket(settings.model_data_bucket)
    names.check_name(config.name, "endpoint name")
    config_name = names.endpoint_config_name(config.name, number)
    pinned = [
        v if v.pinned is not None else v.model_copy(update={"pinned": pin_model(v.model)})
        for v in config.variants
    ]
    filled = settings.model_copy(update={"region": region, "role_arn": role})
    config = config.model_copy(
        update={"variants": pinned, "platform": config.platform.model_copy(update={"sagemaker": filled})}
    )
    deployments = [
        _variant(config.name, number, v, filled, dlc=settings.image is None, count=(counts or {}).get(v.name))
        for v in pinned
    ]
    if async_params is not None:
        deployments = [_with_async_note(v, async_params) for v in deployments]
    return Generation(
        endpoint=config.name, number=number, region=region, role_arn=role, image=image,
        config_name=config_name, config=config, variants=deployments, async_inference=async_params,
    )  # fmt: skip


def _with_async_note(v: VariantDeployment, params: dict[str, Any]) -> VariantDeployment:
    note = async_inference.concurrency_note(v.variant, v.env, params)
    if note is None:
        return v
    sizing = v.sizing.model_copy(update={"notes": [*v.sizing.notes, note]})
    return v.model_copy(update={"sizing": sizing})


def _variant(
    endpoint: str,
    number: int,
    variant: VariantConfig,
    settings: SageMakerSettings,
    *,
    dlc: bool,
    count: int | None,
) -> VariantDeployment:
    pinned = variant.pinned
    assert pinned is not None
    hub, version = _weights_source(pinned, settings)
    source = _shape(pinned, hub)
    sizing = size_variant(
        variant, settings, source, dlc=dlc,
        model_bytes=version.manifest.total_bytes if version is not None and hub is None else None,
        from_hub=hub is not None,
    )  # fmt: skip
    if dlc and version is not None and version.card.prompt_template is not None:
        note = (
            f"variant {variant.name}: TGI formats chats with the tokenizer's chat template, not the "
            f"model card's prompt_template ({version.card.template_label()})"
        )
        sizing = sizing.model_copy(update={"notes": [*sizing.notes, note]})
    env: dict[str, str] = {}
    if hub is not None:
        repo, sha = hub.split("@", 1)
        env.update({"HF_MODEL_ID": repo, "HF_MODEL_REVISION": sha})
    else:
        env["HF_MODEL_ID"] = OPT_ML_MODEL
    env.update(sizing.env)
    if settings.messages_api:
        env["MESSAGES_API_ENABLED"] = "true"
    _check_env(env)
    return VariantDeployment(
        variant=variant.name, model_name=names.model_name(endpoint, number, variant.name),
        instance_type=sizing.instance_type, initial_count=count or variant.replicas, weight=variant.weight,
        env=env, pinned=pinned, hub=hub, version=version if hub is None else None, sizing=sizing,
    )  # fmt: skip


def _weights_source(
    pinned: PinnedModel, settings: SageMakerSettings
) -> tuple[str | None, VersionInfo | None]:
    """(repo@sha the container downloads, or None) and the registry version (for S3)."""
    if pinned.kind == "hub":
        if settings.model_source == "s3":
            raise ValidationError(
                f"{pinned.reference} is a Hub model; with model_source: s3 import it into the registry "
                f"first (`twinserve model import hf://{pinned.name}`)",
                param="platform.sagemaker.model_source",
            )
        return f"{pinned.name}@{pinned.revision}", None
    if pinned.kind != "registry":
        raise ValidationError(
            f"SageMaker deploys registry versions or Hub models, not {pinned.kind} {pinned.reference!r}: "
            "import it first (`twinserve model import NAME FOLDER`) and deploy models:/NAME/VERSION",
            param="variants.model",
        )
    from twinserve.registry.store import ModelRegistry

    assert pinned.name is not None and pinned.version is not None
    info = ModelRegistry().get_version(pinned.name, pinned.version)
    origin = info.origin or ""
    if settings.model_source == "auto" and origin.startswith("hf://") and "@" in origin:
        repo, sha = origin.removeprefix("hf://").rsplit("@", 1)
        if len(sha) == _HUB_SHA:
            return f"{repo}@{sha}", info
    return None, info


def _shape(pinned: PinnedModel, hub: str | None) -> ModelSource | None:
    """The planner's ModelSource of the pin; None when its config.json cannot be had."""
    from twinserve.planner.model_shape import resolve_source

    ref = pinned.load_ref if pinned.kind == "registry" or hub is None else f"hf://{hub}"
    try:
        return resolve_source(ref)
    except NotFoundError:
        return None


def _check_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if len(key) > 1024 or len(value) > 1024:
            raise ValidationError(f"container env {key} is longer than SageMaker's 1024 characters")
