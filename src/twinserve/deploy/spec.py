"""What a real-time endpoint is: its config (YAML for `endpoint create --config`), its state, its events.

```
EndpointConfig ── variants: [VariantConfig {model, replicas, threads, device, limits: ServingLimits, weight}]
               ├─ autoscaling: TargetTrackingPolicy | StepScalingPolicy   (discriminated by `type`)
               └─ async: AsyncInferenceConfig    (a queue in front: POST /async-invocations, scale to 0)
Endpoint (state) ── status: EndpointStatus, variants: [VariantState], replicas: [ReplicaRecord]
ScalingEvent      one autoscaling decision (time, metric value, from → to, reason)
```
The config is what the user asks for; the state is what the control plane made of it. The
concepts follow SageMaker (endpoint config → endpoint, production variants, Application Auto
Scaling policies) so the same YAML can later be deployed by the SageMaker runtime.
"""

from __future__ import annotations

import enum
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from twinserve.config import Dtype, Quantize
from twinserve.deploy.async_config import AsyncInferenceConfig
from twinserve.deploy.lease import OperationHolder, utcnow
from twinserve.deploy.pinning import PinnedModel
from twinserve.deploy.platform_config import PlatformConfig
from twinserve.deploy.policies import AutoscalingPolicy

# RFC 1123 label: it becomes part of URLs, log folders and (later) SageMaker endpoint names
_DNS_LABEL = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
MASKED_SECRET = "**********"


class ServingLimits(BaseModel):
    """TGI's limits for each replica; None leaves the `twinserve serve` default (or the model card's)."""

    model_config = ConfigDict(extra="forbid")

    max_input_tokens: int | None = Field(None, ge=1, description="Longest prompt (MAX_INPUT_TOKENS).")
    max_total_tokens: int | None = Field(
        None, ge=2, description="Prompt + new tokens of one request (MAX_TOTAL_TOKENS)."
    )
    max_batch_prefill_tokens: int | None = Field(
        None, ge=1, description="Prompt tokens prefilled in one step (MAX_BATCH_PREFILL_TOKENS)."
    )
    max_batch_total_tokens: int | None = Field(
        None, ge=2, description="KV-cache budget over all running requests (MAX_BATCH_TOTAL_TOKENS)."
    )
    max_concurrent_requests: int | None = Field(
        None, ge=1, description="Requests in a replica at once; more get 429 (MAX_CONCURRENT_REQUESTS)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServingLimits:
        # only pairs given together can be checked here; `serve` checks the rest at start
        i, t, p, b = (
            self.max_input_tokens,
            self.max_total_tokens,
            self.max_batch_prefill_tokens,
            self.max_batch_total_tokens,
        )
        if i is not None and t is not None and i >= t:
            raise ValueError(f"max_input_tokens ({i}) must be < max_total_tokens ({t})")
        if t is not None and b is not None and t > b:
            raise ValueError(f"max_total_tokens ({t}) must be <= max_batch_total_tokens ({b})")
        if i is not None and p is not None and p < i:
            raise ValueError(f"max_batch_prefill_tokens ({p}) must be >= max_input_tokens ({i})")
        return self

    def _given(self) -> dict[str, int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def serve_args(self) -> list[str]:
        """The `twinserve serve` flags for the limits that are set."""
        args: list[str] = []
        for name, value in self._given().items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        return args

    def serve_env(self) -> dict[str, str]:
        """The same limits under TGI's environment names (what a TGI/SageMaker container reads)."""
        return {name.upper(): str(value) for name, value in self._given().items()}


class VariantConfig(BaseModel):
    """One production variant: a model served by N identical replicas, with a share of the traffic."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("primary", pattern=_DNS_LABEL, description="Unique in the endpoint; a DNS label.")
    model: str = Field(
        min_length=1,
        description="Registry reference (models:/llm-twin@champion, models:/llm-twin/4) or a model folder.",
    )
    replicas: int = Field(1, ge=1, le=64, description="Replicas started at create (autoscaling moves it).")
    threads: int | None = Field(
        None, ge=1, description="CPU threads per replica (torch intra-op); None = all cores."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when available, else cpu."
    )
    dtype: Dtype = Field("auto", description="auto = bf16 where the device runs it fast, else fp32.")
    quantize: Quantize | None = Field(None, description="Weight quantization (TGI's QUANTIZE names).")
    limits: ServingLimits = Field(default_factory=ServingLimits, description="TGI limits per replica.")
    weight: float = Field(
        1.0, ge=0, description="Traffic share relative to the other variants; 0 = only when no other serves."
    )
    pinned: PinnedModel | None = Field(
        None,
        description=(
            "Set by create/update, not by hand: the exact version `model` resolved to. Every replica "
            "of the generation loads this, so moving an alias changes nothing until `endpoint update`."
        ),
    )

    @property
    def load_ref(self) -> str:
        """What a replica loads: the pin when there is one, else the reference as given."""
        return self.pinned.load_ref if self.pinned is not None else self.model


class EndpointConfig(BaseModel):
    """A real-time endpoint as the user asks for it; `endpoint create --config FILE.yaml` reads this.

    `api_key` may be written as `${ENV_VAR}` in YAML: it is read from the environment at load
    and written back as the same reference, so the key itself never lands in a file or a log.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=_DNS_LABEL, description="Endpoint name: a DNS label (a-z, 0-9, '-', ≤ 63).")
    variants: list[VariantConfig] = Field(min_length=1, description="≥ 1 variants with unique names.")
    api_key: SecretStr | None = Field(
        None, description="Bearer key every replica and the router require; None = open endpoint."
    )
    autoscaling: AutoscalingPolicy | None = Field(None, description="None = fixed replica counts.")
    startup_timeout_s: float = Field(
        600.0, gt=0, description="How long a replica may take to become healthy before it counts as failed."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="How long a stopping replica may finish in-flight requests."
    )
    payload_limit: int = Field(
        2_000_000,
        ge=1,
        description="Largest request body in bytes, for the router and every replica alike (413 above).",
    )
    platform: PlatformConfig = Field(
        default_factory=PlatformConfig, description="Where it runs (recorded: later commands need no flag)."
    )
    async_inference: AsyncInferenceConfig | None = Field(
        None,
        alias="async",
        description="Asynchronous inference (YAML `async:`): jobs through a durable queue, results "
        "in a store, webhooks, autoscaling on backlog down to 0 replicas. None = real-time only.",
    )
    _api_key_env: str | None = PrivateAttr(None)

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_masked_key(cls, v: object) -> object:
        if v == MASKED_SECRET:
            raise ValueError("api_key is masked (**********); give the key or a ${ENV_VAR} reference")
        if isinstance(v, str) and not v.strip():  # the replicas would refuse to start with it
            raise ValueError("api_key is set but empty; leave it out for an open endpoint")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> EndpointConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a weight > 0")
        if self.async_inference is not None and len(self.variants) != 1:
            raise ValueError("an async endpoint has exactly one variant (its queue feeds one model)")
        policy = self.autoscaling
        if policy is None:
            return self
        # Serve's proxy holds requests while a replica starts, so Ray scales real-time to zero
        if policy.min_replicas < 1 and self.async_inference is None and self.platform.type != "ray":
            raise ValueError(
                "autoscaling.min_replicas must be >= 1 for a real-time endpoint "
                "(scale to zero needs a queue: use an async endpoint, or the ray platform)"
            )
        if policy.metric == "backlog_per_replica" and self.async_inference is None:
            raise ValueError("autoscaling on backlog_per_replica needs an async endpoint (a queue)")
        if policy.variant is not None and policy.variant not in names:
            raise ValueError(f"autoscaling.variant {policy.variant!r} is not one of {names}")
        for v in self.variants:
            scaled = policy.variant is None or policy.variant == v.name
            if scaled and not max(policy.min_replicas, 1) <= v.replicas <= policy.max_replicas:
                raise ValueError(
                    f"variant {v.name!r} starts with {v.replicas} replicas, outside autoscaling's "
                    f"{policy.min_replicas}..{policy.max_replicas}"
                )
        return self

    @classmethod
    def single(cls, name: str, model: str, *, replicas: int = 1, **endpoint: Any) -> EndpointConfig:
        """The config `endpoint create NAME --model REF --replicas N` means: one variant."""
        return cls.model_validate(
            {"name": name, "variants": [{"model": model, "replicas": replicas}], **endpoint}
        )

    @property
    def is_pinned(self) -> bool:
        return all(v.pinned is not None for v in self.variants)

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"endpoint {self.name!r} has no variant {name!r}")

    # --- YAML and persisted forms ---

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointConfig:
        """Validate a mapping, reading a `${ENV_VAR}` api_key from the environment."""
        data = dict(data)
        env_name = None
        key = data.get("api_key")
        if isinstance(key, str) and (m := _ENV_REF.match(key)):
            env_name = m.group(1)
            if env_name not in os.environ:
                raise ValueError(f"api_key refers to ${{{env_name}}}, which is not set in the environment")
            data["api_key"] = os.environ[env_name]
        config = cls.model_validate(data)
        config._api_key_env = env_name
        return config

    @classmethod
    def from_yaml(cls, source: str | Path) -> EndpointConfig:
        """Load a YAML file (a Path, or a str naming an existing file) or YAML text."""
        text = Path(source).read_text() if isinstance(source, Path) or _is_file(source) else str(source)
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("an endpoint config is a YAML mapping (name:, variants:, ...)")
        return cls.from_dict(data)

    def to_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        """JSON-ready dict; the api_key is its `${ENV_VAR}` reference, masked, or (if asked) the key."""
        data = self.model_dump(mode="json", exclude_none=True, by_alias=True)
        secret = self.async_inference.notify_secret if self.async_inference is not None else None
        if secret is not None and reveal_secrets:
            data["async"]["notify_secret"] = secret.get_secret_value()
        if self.api_key is not None:
            if reveal_secrets:
                data["api_key"] = self.api_key.get_secret_value()
            elif self._api_key_env:
                data["api_key"] = f"${{{self._api_key_env}}}"
            else:
                data["api_key"] = MASKED_SECRET
        return data

    def to_yaml(self, *, reveal_secrets: bool = False) -> str:
        """YAML that `from_yaml` reads back (a masked key is refused there, never silently dropped)."""
        return yaml.safe_dump(self.to_dict(reveal_secrets=reveal_secrets), sort_keys=False)


def _is_file(text: str) -> bool:
    return "\n" not in text and len(text) < 4096 and Path(text).is_file()


class EndpointStatus(enum.StrEnum):
    """Lifecycle of an endpoint (SageMaker's EndpointStatus names)."""

    CREATING = "Creating"
    IN_SERVICE = "InService"
    UPDATING = "Updating"
    ROLLING_BACK = "RollingBack"
    FAILED = "Failed"
    DELETING = "Deleting"

    @property
    def is_terminal(self) -> bool:
        """No operation in progress: the control plane waits for nothing (`create` returns here)."""
        return self in (EndpointStatus.IN_SERVICE, EndpointStatus.FAILED)

    @property
    def accepts_traffic(self) -> bool:
        """The router serves requests (an update or a rollback keeps the old replicas serving)."""
        return self in (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING, EndpointStatus.ROLLING_BACK)


class ReplicaState(enum.StrEnum):
    """One replica's process, as last seen."""

    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    STOPPED = "stopped"

    @property
    def serves(self) -> bool:
        """The router may send it new requests."""
        return self is ReplicaState.HEALTHY

    @property
    def is_live(self) -> bool:
        """A process may still exist (it must be stopped before its record is dropped)."""
        return self is not ReplicaState.STOPPED


class ReplicaRecord(BaseModel):
    """One replica process, persisted so a later CLI process finds (and can stop) it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="Unique over all endpoints, e.g. twin-primary-3f9a1c.")
    endpoint: str = Field(min_length=1, description="Name of the endpoint it belongs to.")
    variant: str = Field(min_length=1, description="Variant it serves.")
    pid: int | None = Field(None, ge=1, description="OS process id (leader of its own process group).")
    port: int = Field(ge=1, le=65535, description="Port on 127.0.0.1.")
    url: str = Field(min_length=1, description="Base URL, e.g. http://127.0.0.1:41234.")
    state: ReplicaState = Field(ReplicaState.STARTING, description="As last seen by the runtime.")
    started_at: datetime = Field(default_factory=utcnow, description="When the process was started (UTC).")
    model_version: str | None = Field(
        None, description="Exact model served once healthy: models:/name/N, or the weights' sha256 prefix."
    )
    log_path: str | None = Field(None, description="File the replica's stdout/stderr go to.")
    generation: int = Field(
        1, ge=1, description="Config generation it was started for (an update starts the next one)."
    )
    start_deadline: datetime | None = Field(
        None, description="UTC; still not healthy by then, it is stopped and replaced."
    )

    @property
    def traffic_group(self) -> str:
        """The router's traffic group: its variant in its generation (blue and green differ)."""
        return traffic_group(self.variant, self.generation)


def traffic_group(variant: str, generation: int) -> str:
    return f"{variant}@{generation}"


class VariantState(BaseModel):
    """Replica counts of one variant: what the control plane aims at and what is healthy now."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Variant name (as in the config).")
    desired_replicas: int = Field(ge=0, description="What the control plane aims at (autoscaling moves it).")
    current_replicas: int = Field(0, ge=0, description="Healthy replicas when last reconciled.")


class Endpoint(BaseModel):
    """An endpoint's state as the control plane keeps it (the store adds `replicas` from its own table)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_DNS_LABEL, description="Same as config.name.")
    config: EndpointConfig = Field(description="The config being served (the target one during an update).")
    status: EndpointStatus = Field(EndpointStatus.CREATING, description="Lifecycle status.")
    variants: list[VariantState] = Field(default_factory=list, description="Per-variant replica counts.")
    url: str | None = Field(None, description="The router's stable URL, once it runs.")
    router_pid: int | None = Field(None, ge=1, description="The router process, once it runs.")
    created_at: datetime = Field(default_factory=utcnow, description="UTC.")
    updated_at: datetime = Field(default_factory=utcnow, description="UTC; the store sets it on each write.")
    failure_reason: str | None = Field(None, description="Why the last operation failed (e.g. log lines).")
    revision: int = Field(0, ge=0, description="Bumped by each store write; 0 = never stored.")
    replicas: list[ReplicaRecord] = Field(default_factory=list, description="Filled by the store on read.")
    generation: int = Field(1, ge=1, description="Generation of `config`; each committed update adds one.")
    target: EndpointConfig | None = Field(
        None, description="During a blue/green update: the config being rolled out (generation + 1)."
    )
    target_share: float = Field(
        0.0, ge=0, le=1, description="During an update: the share of traffic the target's replicas get."
    )
    operation: str | None = Field(
        None, description="Operation holding the endpoint (create, update, scale, replace, delete)."
    )
    operation_holder: OperationHolder | None = Field(
        None, description="Process running `operation`; a dead one means it was interrupted."
    )
    controller_pid: int | None = Field(
        None, ge=1, description="The endpoint's controller process (autoscaling, replacing replicas)."
    )
    async_url: str | None = Field(
        None, description="Async endpoints: the job service the router sends /async-invocations to."
    )
    async_pid: int | None = Field(None, ge=1, description="Async endpoints: the job service's process.")
    resources: dict[str, str] = Field(
        default_factory=dict,
        description="What the platform created for it, by kind (e.g. SageMaker model and config names).",
    )

    @classmethod
    def new(cls, config: EndpointConfig) -> Endpoint:
        """The state `create` starts from: Creating, each variant aiming at its initial replicas."""
        return cls(
            name=config.name,
            config=config,
            variants=[VariantState(name=v.name, desired_replicas=v.replicas) for v in config.variants],
        )

    @model_validator(mode="after")
    def _name_matches(self) -> Endpoint:
        if self.config.name != self.name:
            raise ValueError(f"endpoint {self.name!r} carries the config of {self.config.name!r}")
        return self

    def variant_state(self, name: str) -> VariantState:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"endpoint {self.name!r} has no variant {name!r}")

    def to_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["config"] = self.config.to_dict(reveal_secrets=reveal_secrets)
        if self.target is not None:
            data["target"] = self.target.to_dict(reveal_secrets=reveal_secrets)
        return data

    def config_with_model(self, model: str, *, variant: str | None = None) -> EndpointConfig:
        """The serving config with `model` in `variant` (default: the first), every variant at its
        current desired replica count: what `endpoint update NAME --model REF` rolls out. The
        changed variant loses its pin, so `update` resolves it anew even for the same reference."""
        chosen = variant or self.config.variants[0].name
        self.config.variant(chosen)  # KeyError for an unknown variant
        variants = [
            v.model_copy(
                update={
                    "replicas": max(self.desired(v.name), 1),
                    **({"model": model, "pinned": None} if v.name == chosen else {}),
                }
            )
            for v in self.config.variants
        ]
        config = EndpointConfig.from_dict(
            {
                **self.config.to_dict(reveal_secrets=True),
                "variants": [v.model_dump(mode="json", exclude_none=True) for v in variants],
            }
        )
        config._api_key_env = self.config._api_key_env
        return config

    def config_with_policy(self, policy: AutoscalingPolicy | None) -> EndpointConfig:
        """The serving config with `policy` (None: fixed counts), each scaled variant's start count
        moved into the new bounds so the config validates (the platform moves the running count);
        ValidationError for a policy this endpoint cannot take."""
        from twinserve.errors import ValidationError

        variants = []
        for v in self.config.variants:
            n = self.desired(v.name)
            if policy is not None and policy.variant in (None, v.name):
                n = min(max(n, policy.min_replicas), policy.max_replicas)
            variants.append(v.model_copy(update={"replicas": max(n, 1)}))
        data = self.config.to_dict(reveal_secrets=True)
        data["variants"] = [v.model_dump(mode="json", exclude_none=True) for v in variants]
        data["autoscaling"] = policy.model_dump(mode="json") if policy is not None else None
        try:
            config = EndpointConfig.from_dict(data)
        except ValueError as exc:  # pydantic's ValidationError: a policy this endpoint can't take
            raise ValidationError(f"autoscaling policy for {self.name!r}: {exc}") from exc
        config._api_key_env = self.config._api_key_env  # keep showing the key as its ${ENV} reference
        return config

    def traffic_weights(self) -> dict[str, float]:
        """Weight of each traffic group: the serving generation's variants share `1 - target_share`,
        the target's `target_share`. Groups not named (stale generations) get 0, so they see
        traffic only when nothing else can take it."""
        keep = 1.0 - self.target_share if self.target is not None else 1.0
        weights = {traffic_group(v.name, self.generation): v.weight * keep for v in self.config.variants}
        if self.target is not None:
            for v in self.target.variants:
                weights[traffic_group(v.name, self.generation + 1)] = v.weight * self.target_share
        return weights

    def desired(self, variant: str) -> int:
        """Desired replicas of a variant of the serving config (its initial count if never set)."""
        for v in self.variants:
            if v.name == variant:
                return v.desired_replicas
        return self.config.variant(variant).replicas


class ScalingEvent(BaseModel):
    """One autoscaling decision (or a manual scale), shown by `endpoint describe`."""

    model_config = ConfigDict(extra="forbid")

    time: datetime = Field(default_factory=utcnow, description="When it was decided (UTC).")
    endpoint: str = Field(min_length=1, description="Endpoint name.")
    variant: str = Field(min_length=1, description="Variant scaled.")
    metric: str | None = Field(None, description="Metric the policy read; None for a manual scale.")
    metric_value: float | None = Field(None, description="Its value over the look-back window.")
    from_replicas: int = Field(ge=0, description="Desired replicas before.")
    to_replicas: int = Field(ge=0, description="Desired replicas after.")
    reason: str = Field(description="Why, in words (e.g. 'concurrency 7.5 > target 4').")
