"""Hugging Face Hub snapshots, from the local cache first so a fetched revision works offline."""

from __future__ import annotations

import re
from pathlib import Path

from twinserve.errors import NotFoundError

# what a serving folder needs from the Hub; pickle weights are never fetched
_FULL_SHA = re.compile(r"[0-9a-f]{40}")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def download_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of `repo_id` at `revision`; its name is the exact commit sha.

    NotFoundError (404) with both reasons when it is neither cached nor downloadable.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the local cache first: no network needed once a revision is there
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
        except Exception as exc:
            raise NotFoundError(
                f"model {repo_id}@{revision or 'main'} is neither in the local Hugging Face cache nor "
                f"downloadable ({type(exc).__name__}: {exc})"
            ) from exc
    return Path(folder)


def hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit sha `revision` of `repo_id` means now, without downloading weights: a full sha
    as given, else the local cache's snapshot, else the Hub's answer. NotFoundError otherwise."""
    if revision is not None and _FULL_SHA.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
        ).name
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    try:
        sha = HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:
        raise NotFoundError(
            f"model {repo_id}@{revision or 'main'}: not in the local Hugging Face cache and the Hub "
            f"did not answer ({type(exc).__name__}: {exc})"
        ) from exc
    if not sha:
        raise NotFoundError(f"the Hub gave no commit for {repo_id}@{revision or 'main'}")
    return str(sha)
