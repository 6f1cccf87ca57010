"""Pin a model reference at deploy time: `models:/llm-twin@champion` → one exact version.

An alias moves when a model is promoted; an endpoint must not follow it by accident. So
`create` and `update` resolve each variant's reference once, here, and every replica of that
config generation starts from the pin (`PinnedModel.load_ref`): a scale-out or a replaced replica
after a promotion still serves the version the generation was deployed with. Only an explicit
`endpoint update` re-resolves.

What a pin holds, by kind of reference:
- registry (`models:/name@alias`, `models:/name/N`, `models:/name/latest`): name, version,
  the weights' content hash recorded at import, and the artifact source. Nothing is
  downloaded: the registry's metadata is enough, and replicas verify against the same hash.
- Hub (`hf://org/name@rev`, `org/name`): the commit sha (from the local HF cache or the Hub's
  metadata; no weights fetched), so a moving branch is pinned too.
- a folder or `default`: the absolute path. A folder is the user's to change; it is not hashed
  here (the replica reports the weights' hash it loaded, see `ReplicaRecord.model_version`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from twinserve.registry.refs import AliasRef, DefaultRef, HubRef, LocalRef, VersionRef, parse_ref

if TYPE_CHECKING:
    from twinserve.deploy.spec import EndpointConfig


class PinnedModel(BaseModel):
    """The exact model a config generation serves; set by `create`/`update`, never by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str = Field(min_length=1, description="The reference as the user gave it.")
    kind: str = Field(description="registry | hub | folder | default.")
    name: str | None = Field(None, description="Registered model name, or the Hub repo id.")
    version: int | None = Field(None, ge=1, description="Registry version the reference resolved to.")
    revision: str | None = Field(None, description="Hub commit sha the reference resolved to.")
    content_sha256: str | None = Field(None, description="sha256 over the weight files (registry pins).")
    location: str = Field(
        min_length=1,
        description="Where the files are: the registry's artifact source, the Hub repo, or a folder.",
    )

    @property
    def load_ref(self) -> str:
        """What a replica loads: a reference that can only ever mean this pin."""
        if self.kind == "registry":
            return f"models:/{self.name}/{self.version}"
        if self.kind == "hub":
            return f"hf://{self.name}@{self.revision}"
        return self.location

    @property
    def label(self) -> str:
        """Short form for tables: `llm-twin/4 (sha256 3f9a1c2b…)`."""
        if self.kind == "registry":
            digest = f" (sha256 {self.content_sha256[:12]})" if self.content_sha256 else ""
            return f"{self.name}/{self.version}{digest}"
        if self.kind == "hub":
            return f"{self.name}@{(self.revision or '?')[:12]}"
        return self.location


def pin_model(reference: str) -> PinnedModel:
    """Resolve `reference` to the exact model it means now.

    NotFoundError for an unknown model, version, alias or folder; ValidationError for a
    malformed reference. Registry metadata only: no weights are read or downloaded.
    """
    ref = parse_ref(reference)
    if isinstance(ref, VersionRef | AliasRef):
        from twinserve.registry.store import ModelRegistry

        registry = ModelRegistry()
        if isinstance(ref, AliasRef):
            info = registry.get_version(ref.name, alias=ref.alias)
        else:
            info = registry.get_version(ref.name, ref.version)
        return PinnedModel(
            reference=reference,
            kind="registry",
            name=info.name,
            version=info.version,
            content_sha256=info.content_sha256,
            location=info.source,
        )
    if isinstance(ref, HubRef):
        from twinserve.registry.hub import hub_commit

        return PinnedModel(
            reference=reference,
            kind="hub",
            name=ref.repo_id,
            revision=hub_commit(ref.repo_id, ref.revision),
            location=f"hf://{ref.repo_id}",
        )
    if isinstance(ref, DefaultRef):
        return PinnedModel(reference=reference, kind="default", location="default")
    assert isinstance(ref, LocalRef)
    path = ref.path.expanduser().resolve()
    if not path.is_dir():
        from twinserve.errors import NotFoundError

        raise NotFoundError(f"model {reference!r}: no such folder")
    return PinnedModel(reference=reference, kind="folder", location=str(Path(path)))


def pin_config(config: EndpointConfig, progress: Callable[[str], None] | None = None) -> EndpointConfig:
    """`config` with every variant pinned: a variant keeps its pin while its `model` is the
    reference it was pinned from, and is resolved anew otherwise (or when it has none)."""
    variants = []
    for v in config.variants:
        pinned = v.pinned if v.pinned is not None and v.pinned.reference == v.model else pin_model(v.model)
        if progress is not None and pinned is not v.pinned:
            progress(f"variant {v.name}: {v.model} is pinned to {pinned.label}")
        variants.append(v.model_copy(update={"pinned": pinned}))
    return config.model_copy(update={"variants": variants})
