"""What a model folder holds, and proof that it still holds it.

`content_sha256` is the engine loader's `weights_sha256`: one sha256 over the bytes of the
safetensors shards, in the loader's order (the index's shards sorted, else the sorted
`*.safetensors`), so `/info` and the registry report the same hash. The manifest adds a
sha256 and size per file, so a check can name the one file that changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from twinserve.errors import ModelLoadError, ValidationError

# Unpickling runs arbitrary code: such files are refused, never imported.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
INDEX_NAME = "model.safetensors.index.json"
_CHUNK = 1 << 22

# (bytes just read) — called while hashing, so a caller can show progress
ByteCallback = Callable[[int], None]


class FileEntry(BaseModel):
    """One file of a model folder as it was imported."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the file.")
    size: int = Field(ge=0, description="Size in bytes.")


class Manifest(BaseModel):
    """Every file of a model folder with its digest, and the weights' combined hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    content_sha256: str = Field(description="sha256 over the weight files, as the engine loader computes it.")
    weights: list[str] = Field(description="Weight files in hashing order (relative paths).")
    files: dict[str, FileEntry] = Field(description="Relative path → digest, for every file.")

    @model_validator(mode="after")
    def _weights_listed(self) -> Manifest:
        missing = [w for w in self.weights if w not in self.files]
        if missing:
            raise ValueError(f"weight files without a digest: {', '.join(missing)}")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())


def weight_files(folder: Path) -> list[str]:
    """The safetensors shards in the loader's order; refuses folders with pickle weights."""
    pickles = sorted(p.name for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValidationError(
            f"{folder} holds pickle weights ({', '.join(pickles)}); the registry accepts safetensors only, "
            "because unpickling can run arbitrary code. Convert once with: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True), "
            "then import `out`."
        )
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValidationError(f"{index} is not a safetensors index: {exc}") from exc
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValidationError(f"safetensors shards missing in {folder}: {', '.join(missing)}")
        return shards
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise ValidationError(f"no safetensors weights in {folder}")
    return shards


def check_model_folder(folder: Path) -> list[str]:
    """Refuse what the engine could not load: pickle weights, no config, no tokenizer."""
    if not folder.is_dir():
        raise ValidationError(f"not a folder: {folder}")
    weights = weight_files(folder)
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValidationError(f"{folder} is not a Hugging Face model folder: missing {', '.join(missing)}")
    return weights


def build_manifest(folder: Path, on_bytes: ByteCallback | None = None) -> Manifest:
    """Hash every file of a checked folder (each read once)."""
    weights = check_model_folder(folder)
    combined = hashlib.sha256()
    files: dict[str, FileEntry] = {}
    for rel in _all_files(folder, weights):  # weights first, in hashing order
        path = folder / rel
        digest = _hash_file(path, combined if rel in weights else None, on_bytes)
        files[rel] = FileEntry(sha256=digest, size=path.stat().st_size)
    return Manifest(content_sha256=combined.hexdigest(), weights=weights, files=files)


def verify_folder(folder: Path, manifest: Manifest, on_bytes: ByteCallback | None = None) -> None:
    """ModelLoadError naming the first missing or changed file; silent when all match.

    Presence and sizes are checked before any hashing, so a missing file is reported at once.
    """
    if not folder.is_dir():
        raise ModelLoadError(f"model folder missing: {folder}")
    for rel, expected in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            raise ModelLoadError(f"model file missing: {path} (the registry recorded it at import)")
        if path.stat().st_size != expected.size:
            raise ModelLoadError(
                f"model file changed: {path} has {path.stat().st_size} bytes, {expected.size} recorded at import"
            )
    combined = hashlib.sha256()
    ordered = manifest.weights + [rel for rel in manifest.files if rel not in manifest.weights]
    for rel in ordered:
        path = folder / rel
        digest = _hash_file(path, combined if rel in manifest.weights else None, on_bytes)
        if digest != manifest.files[rel].sha256:
            raise ModelLoadError(
                f"model file corrupted: {path} has sha256 {digest}, "
                f"{manifest.files[rel].sha256} recorded at import"
            )
    if combined.hexdigest() != manifest.content_sha256:  # a manifest edited by hand
        raise ModelLoadError(
            f"weights in {folder} hash to {combined.hexdigest()}, {manifest.content_sha256} recorded at import"
        )


def _all_files(folder: Path, weights: list[str]) -> list[str]:
    # weights first, in hashing order, so the combined digest is fed in one pass
    others = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not _hidden(p, folder)
    )
    return weights + [rel for rel in others if rel not in weights]


def _hidden(path: Path, folder: Path) -> bool:
    # caches and VCS metadata (.git, .cache/huggingface) are not part of a model;
    # dot-files at the top level (e.g. the default model's completion marker) are
    rel = path.relative_to(folder).parts
    return len(rel) > 1 and rel[0].startswith(".")


def _hash_file(path: Path, also: hashlib._Hash | None, on_bytes: ByteCallback | None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if also is not None:
                also.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()
