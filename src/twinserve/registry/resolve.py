"""Turn a model reference into a local Hugging Face layout folder.

References (see `refs.py`): a folder path; `default` (SmolLM2-135M-Instruct, built once);
`models:/name/3` or `models:/name@alias` (through the registry, files verified against the
hashes recorded at import); a Hub id `org/name` or `hf://org/name@revision` (from the local
HF cache first, so it works offline once fetched). The answer always names the exact
revision served: the Hub commit sha, or the registry version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twinserve.errors import NotFoundError
from twinserve.registry.refs import AliasRef, DefaultRef, HubRef, LocalRef, VersionRef, parse_ref

if TYPE_CHECKING:
    from twinserve.registry.card import ModelCard


@dataclass(frozen=True)
class ResolvedModel:
    """A local folder to load, and where it came from.

    For registry references `registry_name`/`registry_version` name the exact version,
    `content_sha256` is the verified weights hash (the engine's `weights_sha256`) and
    `card` its model card (prompt template, generation defaults, limits).
    """

    path: Path
    reference: str
    revision: str | None = None
    card: ModelCard | None = None
    registry_name: str | None = None
    registry_version: int | None = None
    content_sha256: str | None = None

    @property
    def model_id(self) -> str:
        """The name clients see (`/info`, `/v1/models`)."""
        ref = self.reference
        if self.registry_name is not None:
            return self.registry_name
        if ref.startswith("hf://"):
            return ref.removeprefix("hf://").split("@", 1)[0]
        if ref == "default":
            return self.path.name
        return ref if not Path(ref).exists() else self.path.name


def resolve_model(reference: str, revision: str | None = None, *, progress: bool = False) -> ResolvedModel:
    """Where `reference` lives on disk.

    NotFoundError (404) when it can't be had, ValidationError (422) for a malformed
    reference, ModelLoadError (500) when registry files are missing or corrupted.
    """
    ref = parse_ref(reference, revision)
    if isinstance(ref, DefaultRef):
        from twinserve.registry.default_model import ensure_default_model

        return ResolvedModel(ensure_default_model(progress=progress), "default")
    if isinstance(ref, VersionRef | AliasRef):
        from twinserve.registry.store import ModelRegistry

        found = ModelRegistry().resolve(ref)
        return ResolvedModel(
            found.path,
            reference,
            revision=str(found.version),
            card=found.card,
            registry_name=found.name,
            registry_version=found.version,
            content_sha256=found.content_sha256,
        )
    if isinstance(ref, HubRef):
        from twinserve.registry.hub import download_snapshot

        path = download_snapshot(ref.repo_id, ref.revision)
        # snapshot folders are named by commit sha: the exact revision, whatever was asked
        return ResolvedModel(path, reference, revision=path.name)
    assert isinstance(ref, LocalRef)
    if ref.path.is_dir():
        return ResolvedModel(ref.path.resolve(), reference)
    raise NotFoundError(f"model {reference!r}: no such folder, and not a Hub id (org/name)")
