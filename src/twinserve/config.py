"""Configuration: where twinserve keeps its files, how an engine is sized, how a server runs.

`Settings` reads the environment (`TWINSERVE_*`); `EngineConfig` is the engine's
own validated config, with TGI's limit names so a TGI deployment config maps 1:1;
`ServeConfig` is what `twinserve serve` runs with, read from CLI flags and from the
environment under TGI's and SageMaker's names (`HF_MODEL_ID`, `MAX_INPUT_LENGTH`, ...),
so a container config written for TGI starts twinserve unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Quantize = Literal["int8", "int4", "bitsandbytes", "bitsandbytes-nf4"]
Device = Literal["auto", "cpu", "cuda"]
Attention = Literal["auto", "sdpa", "flash_attention_2"]


class Settings(BaseSettings):
    """Process-wide settings from the environment."""

    model_config = SettingsConfigDict(env_prefix="TWINSERVE_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "twinserve",
        description="Root for cached models and state (TWINSERVE_HOME).",
    )
    registry_uri: str | None = Field(
        None,
        description=(
            "MLflow store of the model registry (TWINSERVE_REGISTRY_URI): sqlite:///…, "
            "postgresql://…, or an MLflow server URL. None = a SQLite file under `home`."
        ),
    )
    registry_artifacts: str | None = Field(
        None,
        description="Where version files go (TWINSERVE_REGISTRY_ARTIFACTS): a folder or s3://…; None = beside the store.",
    )

    fused_kernels: bool = Field(
        True,
        description=(
            "Run the engine's CPU decode step through its compiled kernels (TWINSERVE_FUSED_KERNELS); "
            "false = pure PyTorch. Built once per machine; without a compiler the engine falls back."
        ),
    )

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def get_settings() -> Settings:
    return Settings()


# ~250 ms of prefill for a 135M model on 2 AVX-512/AMX cores: a burst's first half gets its
# first token within one such pass, and a running stream never stalls much longer
CPU_PREFILL_STEP_TOKENS = 768
# the most draft tokens one verifying pass checks per row (prompt-lookup speculation)
MAX_SPECULATE = 16


class EngineConfig(BaseModel):
    """How one engine loads its model and bounds its work."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Path of a Hugging Face layout folder (safetensors).")
    dtype: Dtype = Field("auto", description="auto = bf16 where the device runs it fast, else fp32.")
    quantize: Quantize | None = Field(None, description="Weight quantization (TGI's QUANTIZE names).")
    device: Device = Field("auto", description="auto = cuda when available, else cpu.")
    attention: Attention = Field(
        "auto", description="auto = flash_attention_2 when installed on a GPU, else sdpa."
    )
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; None = all cores.")
    max_input_tokens: int = Field(1024, ge=1, description="Longest prompt accepted, in tokens.")
    max_total_tokens: int = Field(2048, ge=2, description="Prompt + new tokens of one request.")
    max_batch_prefill_tokens: int = Field(
        4096, ge=1, description="Prompt tokens prefilled in one step (bounds stalls of running streams)."
    )
    prefill_step_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "Soft target of (padded) prompt tokens per prefill pass: newcomers join one pass until "
            "it is reached, a lone prompt always goes. Smaller passes give the first requests of a "
            "burst their first token sooner and shorten the stall of running streams. "
            f"None = {CPU_PREFILL_STEP_TOKENS} on CPU (prefill is compute-bound there), "
            "max_batch_prefill_tokens on GPU."
        ),
    )
    share_prompt_prefix: bool = Field(
        True,
        description=(
            "Prefill the prompt prefix a prefill group shares (a system prompt, a chat header) "
            "once and copy its KV to every row, instead of computing it per row."
        ),
    )
    speculate: int = Field(
        0,
        ge=0,
        le=MAX_SPECULATE,
        description=(
            "Prompt-lookup speculative decoding: draft up to this many tokens per step from the "
            "request's own prompt and answer, verify them in one pass and keep those the model "
            "agrees with (greedy rows only; output unchanged). 0 = off."
        ),
    )
    prefix_cache: bool = Field(
        True,
        description=(
            "Reuse the KV of earlier prompts for prompts that start the same way: running "
            "requests' prompts from their slots, finished requests' prompt + answer as kept "
            "copies (within max_batch_total_tokens, evicted LRU when running requests need the room)."
        ),
    )
    max_batch_total_tokens: int = Field(
        32768, ge=2, description="KV-cache budget in tokens over all running requests."
    )
    kv_cache_idle_release_s: float = Field(
        10.0,
        ge=0,
        description=(
            "Seconds without work after which the slot KV cache's memory is freed (0 = as soon as "
            "the engine is idle). Holding it over short pauses spares the next burst a reallocation, "
            "whose page faults cost ~50 ms per 200 MB on 2 cores; jemalloc decays dirty pages after "
            "10 s for the same reason. Prefix cache entries are kept either way."
        ),
    )
    max_batch_size: int = Field(64, ge=1, description="Requests decoded together in one step.")
    max_concurrent_requests: int = Field(
        128,
        ge=1,
        description=("Requests in the engine (validating, waiting or running); more get an overload error."),
    )
    validation_workers: int = Field(
        2,
        ge=1,
        description=(
            "Threads that tokenize and validate requests off the event loop (TGI's validation "
            "workers), so a huge prompt never delays other streams."
        ),
    )
    seed: int = Field(0, ge=0, description="Seeds the choice of per-request seeds when none is given.")
    weights_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description=(
            "The weights' sha256 when it is already known and verified (a registry version: its "
            "content hash, checked on resolve). The loader reports it as is instead of reading every "
            "weight file once more to hash it. None = the loader hashes the files."
        ),
    )

    @model_validator(mode="after")
    def _limits_consistent(self) -> EngineConfig:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("max_input_tokens must be < max_total_tokens")
        if self.max_total_tokens > self.max_batch_total_tokens:
            raise ValueError("max_total_tokens must be <= max_batch_total_tokens")
        if self.max_batch_prefill_tokens < self.max_input_tokens:
            raise ValueError("max_batch_prefill_tokens must be >= max_input_tokens")
        return self


def _env(*names: str) -> AliasChoices:
    """Field aliases: the `TWINSERVE_*` name first, then the TGI / SageMaker names."""
    return AliasChoices(*names)


class ServeConfig(BaseSettings):
    """Everything `twinserve serve` needs; each field also reads TGI's environment names.

    Precedence: CLI flag > `TWINSERVE_<NAME>` > the TGI/SageMaker name > default.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, case_sensitive=False)

    model: str = Field(
        "default",
        validation_alias=_env("TWINSERVE_MODEL", "HF_MODEL_ID", "MODEL_ID"),
        description="Model folder, `hf://org/name@rev`, a Hub id, or `default` (SmolLM2-135M-Instruct).",
    )
    revision: str | None = Field(
        None,
        validation_alias=_env("TWINSERVE_REVISION", "HF_MODEL_REVISION", "REVISION"),
        description="Hub revision (commit sha, tag or branch) when `model` is a Hub id.",
    )
    host: str | None = Field(
        None,
        validation_alias=_env("TWINSERVE_HOST"),
        description="None = 0.0.0.0 inside a SageMaker container, else 127.0.0.1 (never all interfaces by accident).",
    )
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        validation_alias=_env("TWINSERVE_PORT", "PORT"),
        description="None = 8080 inside a SageMaker container (SM_* env present), else 3000 like TGI.",
    )
    dtype: Dtype = Field("auto", validation_alias=_env("TWINSERVE_DTYPE", "DTYPE"))
    quantize: Quantize | None = Field(
        None, validation_alias=_env("TWINSERVE_QUANTIZE", "HF_MODEL_QUANTIZE", "QUANTIZE")
    )
    num_shard: int = Field(
        1,
        ge=1,
        validation_alias=_env("TWINSERVE_NUM_SHARD", "SM_NUM_GPUS", "NUM_SHARD"),
        description="Devices to shard the model over (tensor parallelism); 1 on CPU.",
    )
    num_threads: int | None = Field(
        None, ge=1, validation_alias=_env("TWINSERVE_NUM_THREADS"), description="CPU threads."
    )
    max_input_tokens: int = Field(
        1024,
        ge=1,
        validation_alias=_env("TWINSERVE_MAX_INPUT_TOKENS", "MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"),
    )
    max_total_tokens: int = Field(
        2048,
        ge=2,
        validation_alias=_env("TWINSERVE_MAX_TOTAL_TOKENS", "MAX_TOTAL_TOKENS"),
    )
    max_batch_prefill_tokens: int | None = Field(
        None,
        ge=1,
        validation_alias=_env("TWINSERVE_MAX_BATCH_PREFILL_TOKENS", "MAX_BATCH_PREFILL_TOKENS"),
        description="None = max(4096, max_input_tokens).",
    )
    max_batch_total_tokens: int | None = Field(
        None,
        ge=2,
        validation_alias=_env("TWINSERVE_MAX_BATCH_TOTAL_TOKENS", "MAX_BATCH_TOTAL_TOKENS"),
        description="None = max(32768, max_total_tokens).",
    )
    prefill_step_tokens: int | None = Field(
        None,
        ge=1,
        validation_alias=_env("TWINSERVE_PREFILL_STEP_TOKENS"),
        description="Soft prompt-token target per prefill pass (see EngineConfig); None = by device.",
    )
    share_prompt_prefix: bool = Field(
        True, validation_alias=_env("TWINSERVE_SHARE_PROMPT_PREFIX"), description="See EngineConfig."
    )
    speculate: int = Field(
        0,
        ge=0,
        le=MAX_SPECULATE,
        validation_alias=_env("TWINSERVE_SPECULATE", "SPECULATE"),
        description="Draft tokens per step from prompt lookup (see EngineConfig); 0 = off.",
    )
    prefix_cache: bool = Field(
        True,
        validation_alias=_env("TWINSERVE_PREFIX_CACHE", "PREFIX_CACHING", "USE_PREFIX_CACHING"),
        description="Reuse the KV of earlier requests' prompts (see EngineConfig); --no-prefix-cache turns it off.",
    )
    kv_cache_idle_release_s: float = Field(
        10.0,
        ge=0,
        validation_alias=_env("TWINSERVE_KV_CACHE_IDLE_RELEASE_S"),
        description="Seconds idle before the slot KV cache's memory is freed (see EngineConfig).",
    )
    max_batch_size: int = Field(64, ge=1, validation_alias=_env("TWINSERVE_MAX_BATCH_SIZE", "MAX_BATCH_SIZE"))
    max_concurrent_requests: int = Field(
        128,
        ge=1,
        validation_alias=_env("TWINSERVE_MAX_CONCURRENT_REQUESTS", "MAX_CONCURRENT_REQUESTS"),
    )
    max_client_batch_size: int = Field(
        16,
        ge=1,
        validation_alias=_env("TWINSERVE_MAX_CLIENT_BATCH_SIZE", "MAX_CLIENT_BATCH_SIZE"),
        description="Choices one request may ask for: prompts in a /v1/completions list × `n`.",
    )
    validation_workers: int = Field(
        2,
        ge=1,
        validation_alias=_env("TWINSERVE_VALIDATION_WORKERS", "VALIDATION_WORKERS"),
        description="Threads that tokenize and render chat templates off the event loop.",
    )
    api_key: SecretStr | None = Field(
        None,
        validation_alias=_env("TWINSERVE_API_KEY", "API_KEY"),
        description=(
            "Bearer key required on generation routes (and the docs, unless public_docs); "
            "health, info and metrics stay open. Surrounding spaces are ignored; empty is an error."
        ),
    )
    public_docs: bool = Field(
        False,
        validation_alias=_env("TWINSERVE_PUBLIC_DOCS"),
        description="Serve /docs, /redoc and /openapi.json without the API key when one is set.",
    )
    payload_limit: int = Field(
        2_000_000,
        ge=1,
        validation_alias=_env("TWINSERVE_PAYLOAD_LIMIT", "PAYLOAD_LIMIT"),
        description="Largest request body in bytes (TGI's default); larger gets 413.",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        validation_alias=_env("TWINSERVE_DRAIN_TIMEOUT_S"),
        description="On SIGTERM, how long in-flight requests may take to finish before the exit.",
    )
    drain_grace_s: float = Field(
        5.0,
        ge=0,
        validation_alias=_env("TWINSERVE_DRAIN_GRACE_S"),
        description=(
            "On SIGTERM, how long the port keeps answering (503 on /health and /ping, so a load "
            "balancer sees the replica leave) before it closes; longer while requests are in flight."
        ),
    )
    sse_keepalive_s: float = Field(
        15.0,
        gt=0,
        validation_alias=_env("TWINSERVE_SSE_KEEPALIVE_S"),
        description="A stream that has sent nothing for this long gets an SSE comment (proxies' idle timeouts).",
    )
    log_prompts: bool = Field(
        False,
        validation_alias=_env("TWINSERVE_LOG_PROMPTS"),
        description="Put prompt and generated text in the logs (off: logs carry sizes and timings only).",
    )
    log_format: Literal["json", "text"] = Field("json", validation_alias=_env("TWINSERVE_LOG_FORMAT"))
    warmup: bool = Field(True, validation_alias=_env("TWINSERVE_WARMUP"))

    @field_validator("api_key", mode="after")
    @classmethod
    def _clean_api_key(cls, v: SecretStr | None) -> SecretStr | None:
        # stripped as the caller's key is; set-but-blank is a mistake, not "auth off"
        if v is None:
            return None
        key = v.get_secret_value().strip()
        if not key:
            raise ValueError("the API key is set but empty; unset it to serve without a key")
        return SecretStr(key)

    @field_validator("quantize", mode="before")
    @classmethod
    def _empty_quantize(cls, v: object) -> object:
        # TGI deployments often carry QUANTIZE="" for "none"
        return None if v in ("", "none", "None") else v

    def resolved_host(self) -> str:
        if self.host is not None:
            return self.host
        return "0.0.0.0" if in_sagemaker_container() else "127.0.0.1"

    def resolved_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8080 if in_sagemaker_container() else 3000

    def engine_config(self, model_path: str) -> EngineConfig:
        """The engine's config for the resolved local model folder."""
        return EngineConfig(
            model=model_path,
            dtype=self.dtype,
            quantize=self.quantize,
            num_threads=self.num_threads,
            max_input_tokens=self.max_input_tokens,
            max_total_tokens=self.max_total_tokens,
            max_batch_prefill_tokens=self.max_batch_prefill_tokens or max(4096, self.max_input_tokens),
            max_batch_total_tokens=self.max_batch_total_tokens or max(32768, self.max_total_tokens),
            prefill_step_tokens=self.prefill_step_tokens,
            share_prompt_prefix=self.share_prompt_prefix,
            prefix_cache=self.prefix_cache,
            kv_cache_idle_release_s=self.kv_cache_idle_release_s,
            speculate=self.speculate,
            max_batch_size=self.max_batch_size,
            max_concurrent_requests=self.max_concurrent_requests,
            validation_workers=self.validation_workers,
        )


def in_sagemaker_container() -> bool:
    """SageMaker sets SM_* variables in every hosting container."""
    import os

    return any(k.startswith("SM_") for k in os.environ)
