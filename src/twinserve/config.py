"""Configuration: where twinserve keeps its files, and how an engine is sized.

`Settings` reads the environment (`TWINSERVE_*`); `EngineConfig` is the engine's
own validated config, with TGI's limit names so a TGI deployment config maps 1:1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Quantize = Literal["int8", "bitsandbytes", "bitsandbytes-nf4"]
Device = Literal["auto", "cpu", "cuda"]
Attention = Literal["auto", "sdpa", "flash_attention_2"]


class Settings(BaseSettings):
    """Process-wide settings from the environment."""

    model_config = SettingsConfigDict(env_prefix="TWINSERVE_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "twinserve",
        description="Root for cached models and state (TWINSERVE_HOME).",
    )

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def get_settings() -> Settings:
    return Settings()


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
    max_batch_total_tokens: int = Field(
        32768, ge=2, description="KV-cache budget in tokens over all running requests."
    )
    max_batch_size: int = Field(64, ge=1, description="Requests decoded together in one step.")
    max_concurrent_requests: int = Field(
        128, ge=1, description="Requests in the engine (running + waiting); more get an overload error."
    )
    seed: int = Field(0, ge=0, description="Seeds the choice of per-request seeds when none is given.")

    @model_validator(mode="after")
    def _limits_consistent(self) -> EngineConfig:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("max_input_tokens must be < max_total_tokens")
        if self.max_total_tokens > self.max_batch_total_tokens:
            raise ValueError("max_total_tokens must be <= max_batch_total_tokens")
        if self.max_batch_prefill_tokens < self.max_input_tokens:
            raise ValueError("max_batch_prefill_tokens must be >= max_input_tokens")
        return self
