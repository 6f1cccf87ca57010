"""Model references, parsed once into a typed value.

Forms, in the order they are tried:

| reference                      | value              | meaning                                        |
|--------------------------------|--------------------|------------------------------------------------|
| `default`                      | `DefaultRef`       | SmolLM2-135M-Instruct, built once into the cache |
| `models:/<name>/<version>`     | `VersionRef`       | a registry version (`latest` = the highest)    |
| `models:/<name>@<alias>`       | `AliasRef`         | the version an alias points at now             |
| `hf://<org>/<name>[@<rev>]`    | `HubRef`           | a Hugging Face Hub repo at a revision          |
| an existing path, or `/…`, `.…`, `~…` | `LocalRef`  | a Hugging Face layout folder                   |
| `<org>/<name>[@<rev>]`         | `HubRef`           | a Hub id, only when no such path exists        |

`models:/` follows MLflow's own model URI forms, so a reference copied from `mlflow ui`
works here. Syntax errors raise ValidationError (422); whether the thing exists is decided
when the reference is resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from twinserve.errors import ValidationError

MODELS_SCHEME = "models:/"
HF_SCHEME = "hf://"
LATEST = "latest"

# MLflow names may hold almost anything; only the separators of the URI forms are excluded.
_NAME = r"[^/@\s][^/@]*"
# MLflow's alias rule: word characters and dashes (and not `latest` or `v<digits>`, checked below).
_ALIAS = r"[\w-]+"
_VERSION_RE = re.compile(rf"^(?P<name>{_NAME})/(?P<version>[^/@]+)$")
_ALIAS_RE = re.compile(rf"^(?P<name>{_NAME})@(?P<alias>{_ALIAS})$")
_HUB_PART = r"[A-Za-z0-9][\w.-]*"
_HUB_RE = re.compile(rf"^(?P<repo>{_HUB_PART}/{_HUB_PART})(?:@(?P<rev>[^@\s]+))?$")


@dataclass(frozen=True)
class LocalRef:
    """A folder on this machine."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class DefaultRef:
    """The default model (SmolLM2-135M-Instruct)."""

    def __str__(self) -> str:
        return "default"


@dataclass(frozen=True)
class VersionRef:
    """One version of a registered model; `version=None` means the latest."""

    name: str
    version: int | None

    def __str__(self) -> str:
        return f"{MODELS_SCHEME}{self.name}/{self.version if self.version is not None else LATEST}"


@dataclass(frozen=True)
class AliasRef:
    """Whichever version of a registered model an alias points at."""

    name: str
    alias: str

    def __str__(self) -> str:
        return f"{MODELS_SCHEME}{self.name}@{self.alias}"


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face Hub repository; `revision=None` means the default branch."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HF_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


RegistryRef = VersionRef | AliasRef
ModelRef = LocalRef | DefaultRef | VersionRef | AliasRef | HubRef


def parse_ref(reference: str, revision: str | None = None) -> ModelRef:
    """Parse a model reference; `revision` (e.g. `--revision`) overrides a Hub ref's `@rev`."""
    ref = reference.strip()
    if not ref:
        raise ValidationError("empty model reference")
    if ref == "default":
        return DefaultRef()
    if ref.startswith(MODELS_SCHEME):
        return parse_registry_spec(ref.removeprefix(MODELS_SCHEME), reference)
    if ref.startswith(HF_SCHEME):
        hub = _parse_hub(ref.removeprefix(HF_SCHEME), revision)
        if hub is None:
            raise ValidationError(
                f"bad Hub reference {reference!r}: expected hf://org/name or hf://org/name@rev"
            )
        return hub
    path = Path(ref).expanduser()
    if ref.startswith(("/", ".", "~")) or path.exists():
        return LocalRef(path)
    hub = _parse_hub(ref, revision)
    return hub if hub is not None else LocalRef(path)


def parse_registry_spec(spec: str, reference: str | None = None) -> RegistryRef:
    """`name/3`, `name/latest` or `name@alias` (what follows `models:/`) into a registry ref."""
    shown = reference if reference is not None else spec
    if match := _ALIAS_RE.match(spec):
        alias = match["alias"]
        _check_alias(alias, shown)
        return AliasRef(match["name"], alias)
    if match := _VERSION_RE.match(spec):
        return VersionRef(match["name"], _parse_version(match["version"], shown))
    raise ValidationError(
        f"bad registry reference {shown!r}: expected models:/<name>/<version> or models:/<name>@<alias> "
        "(e.g. models:/llm-twin/3, models:/llm-twin@champion)"
    )


def parse_model_spec(spec: str) -> tuple[str, RegistryRef | None]:
    """A CLI model argument: `name` alone (no version chosen), `name/3` or `name@alias`."""
    spec = spec.removeprefix(MODELS_SCHEME)
    if "/" not in spec and "@" not in spec:
        if not re.fullmatch(_NAME, spec):
            raise ValidationError(f"bad model name {spec!r}")
        return spec, None
    ref = parse_registry_spec(spec)
    return ref.name, ref


def check_alias(alias: str) -> str:
    """The alias if MLflow accepts it as one; ValidationError otherwise."""
    if not re.fullmatch(_ALIAS, alias):
        raise ValidationError(f"bad alias {alias!r}: use letters, digits, '_' and '-'")
    _check_alias(alias, alias)
    return alias


def _check_alias(alias: str, shown: str) -> None:
    # MLflow reserves these: `latest` and `v3` read as versions
    if alias.lower() == LATEST or re.fullmatch(r"[vV]\d+", alias):
        raise ValidationError(f"bad alias in {shown!r}: {alias!r} is reserved (it reads as a version)")


def _parse_version(text: str, shown: str) -> int | None:
    if text == LATEST:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValidationError(
            f"bad registry reference {shown!r}: version must be a number >= 1 or 'latest' "
            f"(stages like 'Production' are not supported; use an alias: models:/<name>@<alias>)"
        )
    return int(text)


def _parse_hub(text: str, revision: str | None) -> HubRef | None:
    match = _HUB_RE.match(text)
    if match is None:
        return None
    return HubRef(match["repo"], revision or match["rev"])
