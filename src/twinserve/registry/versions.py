"""What the registry answers with, and how a version is laid out in MLflow.

Every version is an MLflow model version plus the MLflow run that imported it:

- version tags (read in the same query as the version, so `get_version` is one round trip):
  `twinserve.content_sha256`, `twinserve.manifest` (per-file sha256 and size, JSON),
  `twinserve.card` (the model card, JSON), `twinserve.storage` (`copy` | `reference`),
  `twinserve.origin` (where it was imported from; for the Hub, with the resolved commit sha);
- the run: artifacts `model/` (the folder, when copied), `twinserve-card.json` and
  `twinserve-manifest.json` (the same card and manifest, for people browsing `mlflow ui`),
  and the version's metrics (`log_metrics`), so `mlflow ui` shows them on the run.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from twinserve.errors import ModelLoadError
from twinserve.registry.card import ModelCard
from twinserve.registry.content import Manifest

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

TAG_PREFIX = "twinserve."
TAG_CONTENT_SHA = "twinserve.content_sha256"
TAG_MANIFEST = "twinserve.manifest"
TAG_CARD = "twinserve.card"
TAG_STORAGE = "twinserve.storage"
TAG_ORIGIN = "twinserve.origin"
TAG_IMPORT_STATE = "twinserve.import"  # on the run: pending → done, or failed
MODEL_ARTIFACT_PATH = "model"
MANIFEST_FILENAME = "twinserve-manifest.json"


class Storage(enum.StrEnum):
    """Whether the registry holds the files or points at a folder it does not own."""

    COPY = "copy"
    REFERENCE = "reference"


class VersionInfo(BaseModel):
    """One registry version, as `get_version` and `list_versions` report it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registered model name.")
    version: int = Field(ge=1, description="Version number (MLflow's, from 1).")
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing at this version now.")
    created: datetime = Field(description="When the version was registered (UTC).")
    source: str = Field(
        description="MLflow source URI of the files (run artifacts, or the referenced folder)."
    )
    storage: Storage = Field(description="copy: files are run artifacts; reference: a folder in place.")
    origin: str | None = Field(None, description="Where it was imported from (folder, gguf, hf://…@sha).")
    content_sha256: str = Field(description="sha256 over the weight files (the engine's weights_sha256).")
    manifest: Manifest = Field(description="Per-file digests recorded at import.")
    card: ModelCard = Field(description="Model card recorded at import.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Latest value of each logged metric.")
    tags: dict[str, str] = Field(default_factory=dict, description="Version tags other than twinserve's own.")
    run_id: str | None = Field(None, description="MLflow run that imported the version (holds its metrics).")

    @property
    def uri(self) -> str:
        """The version's `models:/name/version` reference."""
        return f"models:/{self.name}/{self.version}"


class ResolvedVersion(BaseModel):
    """A verified local folder for a registry reference, with what the server needs to report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str = Field(description="The reference as given (e.g. models:/llm-twin@champion).")
    name: str = Field(description="Registered model name.")
    version: int = Field(ge=1, description="The exact version the reference resolved to.")
    path: Path = Field(description="Local Hugging Face layout folder to load.")
    content_sha256: str = Field(description="sha256 over the weight files, verified on resolve.")
    card: ModelCard = Field(description="The version's model card.")
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing at the version now.")


class ModelSummary(BaseModel):
    """One registered model, as `list_models` reports it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registered model name.")
    latest_version: int | None = Field(None, description="Highest version number (None: no versions).")
    aliases: dict[str, int] = Field(default_factory=dict, description="Alias → version it points at.")
    created: datetime = Field(description="When the model was registered (UTC).")
    updated: datetime = Field(description="Last change to the model or its versions (UTC).")
    description: str | None = Field(None, description="Free text, as MLflow stores it.")


class AliasMove(BaseModel):
    """One move of an alias: who pointed it where, when, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alias: str = Field(description="The alias that moved.")
    from_version: int | None = Field(None, description="Version it pointed at before (None: new alias).")
    to_version: int | None = Field(None, description="Version it points at after (None: alias deleted).")
    user: str = Field(description="Operating-system user who moved it.")
    time: datetime = Field(description="When (UTC).")
    reason: str | None = Field(None, description="Why, as given by the mover (e.g. a gate result).")


def version_info(
    mv: ModelVersion, metrics: dict[str, float], aliases: list[str] | None = None
) -> VersionInfo:
    """Our view of an MLflow model version; ModelLoadError when twinserve's tags are missing.

    `aliases` overrides the version's own list (which MLflow fills in only on some reads).
    """
    tags = dict(mv.tags or {})
    where = f"models:/{mv.name}/{mv.version}"
    try:
        manifest = Manifest.model_validate_json(tags[TAG_MANIFEST])
        card = ModelCard.model_validate_json(tags[TAG_CARD])
        content_sha = tags[TAG_CONTENT_SHA]
        storage = Storage(tags.get(TAG_STORAGE, Storage.COPY))
    except (KeyError, ValueError, PydanticValidationError) as exc:
        raise ModelLoadError(
            f"{where} was not registered by twinserve (its tags lack {exc}); "
            "import the model with `twinserve registry import`"
        ) from exc
    return VersionInfo(
        name=mv.name,
        version=int(mv.version),
        aliases=aliases if aliases is not None else sorted(mv.aliases or []),
        created=_utc(mv.creation_timestamp),
        source=mv.source or "",
        storage=storage,
        origin=tags.get(TAG_ORIGIN),
        content_sha256=content_sha,
        manifest=manifest,
        card=card,
        metrics=metrics,
        tags={k: v for k, v in tags.items() if not k.startswith(TAG_PREFIX)},
        run_id=mv.run_id or None,
    )


def model_summary(rm: RegisteredModel) -> ModelSummary:
    """Our view of an MLflow registered model."""
    versions = [int(mv.version) for mv in rm.latest_versions or []]
    return ModelSummary(
        name=rm.name,
        latest_version=max(versions) if versions else None,
        aliases=aliases_of(rm),
        created=_utc(rm.creation_timestamp),
        updated=_utc(rm.last_updated_timestamp),
        description=rm.description or None,
    )


def aliases_of(rm: RegisteredModel) -> dict[str, int]:
    """Alias → version (MLflow returns a dict or alias objects depending on the store)."""
    raw = rm.aliases or {}
    pairs = raw.items() if isinstance(raw, dict) else ((a.alias, a.version) for a in raw)
    return {alias: int(version) for alias, version in pairs}


def _utc(millis: int | None) -> datetime:
    return datetime.fromtimestamp((millis or 0) / 1000, tz=UTC)
