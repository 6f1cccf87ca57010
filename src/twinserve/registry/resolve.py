"""Turn a model reference into a local Hugging Face layout folder.

References: a folder path; `default` (SmolLM2-135M-Instruct, built once); a Hub id
`org/name` or `hf://org/name@revision` (from the local HF cache first, so it works
offline once fetched). The answer always names the exact revision served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twinserve.errors import NotFoundError

# what a serving folder needs from the Hub; pickle weights are never fetched
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ResolvedModel:
    """A local folder to load, and where it came from."""

    path: Path
    reference: str
    revision: str | None = None

    @property
    def model_id(self) -> str:
        """The name clients see (`/info`, `/v1/models`)."""
        ref = self.reference
        if ref.startswith("hf://"):
            return ref.removeprefix("hf://").split("@", 1)[0]
        if ref == "default":
            return self.path.name
        return ref if not Path(ref).exists() else self.path.name


def resolve_model(reference: str, revision: str | None = None, *, progress: bool = False) -> ResolvedModel:
    """Where `reference` lives on disk; NotFoundError (404) with the reason when it can't be had."""
    if reference == "default":
        from twinserve.registry.default_model import ensure_default_model

        return ResolvedModel(ensure_default_model(progress=progress), "default")
    if reference.startswith("models:/"):
        raise NotFoundError(
            f"{reference!r}: registry references (models:/name@alias) need the model registry, "
            "which this version does not have; pass a folder or a Hub id"
        )
    path = Path(reference).expanduser()
    if path.is_dir():
        return ResolvedModel(path.resolve(), reference)
    repo_id, rev = _parse_hub_reference(reference, revision)
    if repo_id is None:
        raise NotFoundError(f"model {reference!r}: no such folder, and not a Hub id (org/name)")
    return _from_hub(reference, repo_id, rev)


def _parse_hub_reference(reference: str, revision: str | None) -> tuple[str | None, str | None]:
    ref = reference.removeprefix("hf://")
    if "@" in ref:
        ref, rev = ref.split("@", 1)
        revision = revision or rev
    parts = ref.split("/")
    if len(parts) != 2 or not all(parts) or reference.startswith(("/", ".", "~")):
        return None, revision
    return ref, revision


def _from_hub(reference: str, repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the local cache first: no network needed once a revision is there
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
        except Exception as exc:
            raise NotFoundError(
                f"model {repo_id}@{revision or 'main'} is neither in the local Hugging Face cache nor "
                f"downloadable ({type(exc).__name__}: {exc})"
            ) from exc
    path = Path(folder)
    # snapshot folders are named by commit sha: the exact revision, whatever was asked
    return ResolvedModel(path, reference, revision=path.name)
