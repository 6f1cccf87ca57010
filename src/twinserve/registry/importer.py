"""Import a model folder as a new registry version, all or nothing.

Order of work, so an interrupted import never leaves a visible version:
1. check and hash the folder (pickle weights refused, safetensors + config + tokenizer required);
2. open an MLflow run tagged `twinserve.import=pending` and copy the files into its artifacts
   (or, with `copy=False`, only record the folder's path);
3. under the store's lock: refuse a duplicate (same content hash already a version of the
   name), then create the model version; this is the moment it becomes visible;
4. mark the run `done` and finished.
A failure before 3 completes marks the run `failed`, deletes it and its copied files; a process
killed outright leaves a run `pending` (never a version); `prune_failed_imports` removes those.
"""

from __future__ import annotations

import getpass
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twinserve.errors import ValidationError
from twinserve.registry.backend import StoreLocation, local_path, mlflow_errors
from twinserve.registry.card import CARD_FILENAME, ModelCard
from twinserve.registry.content import Manifest, build_manifest, verify_folder
from twinserve.registry.versions import (
    MANIFEST_FILENAME,
    MODEL_ARTIFACT_PATH,
    TAG_CARD,
    TAG_CONTENT_SHA,
    TAG_IMPORT_STATE,
    TAG_MANIFEST,
    TAG_ORIGIN,
    TAG_STORAGE,
    Storage,
    VersionInfo,
    version_info,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

EXPERIMENT_NAME = "twinserve-registry"
TAG_MODEL = "twinserve.model"
TAG_VERSION = "twinserve.version"
_MAX_TAG_CHARS = 100_000  # MLflow's limit for a model version tag value
_NAME_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,254}")

# (phase label, bytes done, bytes total): how imports report progress
ProgressFn = Callable[[str, int, int], None]


class DuplicateImportError(ValidationError):
    """The same weights (content hash) are already a version of this registered model."""

    def __init__(self, message: str, existing: VersionInfo) -> None:
        super().__init__(message)
        self.existing = existing


@dataclass(frozen=True)
class ImportRequest:
    """One import: what to register, from where, and how."""

    name: str
    source: Path
    card: ModelCard
    copy: bool = True
    force: bool = False
    origin: str | None = None


def check_name(name: str) -> str:
    """Registered model names: letters, digits, `_`, `.`, `-` (so they read well in `models:/` refs)."""
    if not _NAME_RE.fullmatch(name):
        raise ValidationError(
            f"bad model name {name!r}: start with a letter or digit, then letters, digits, '_', '.', '-'"
        )
    return name


def run_import(
    client: MlflowClient, location: StoreLocation, request: ImportRequest, progress: ProgressFn | None
) -> VersionInfo:
    """Register `request.source` as a new version of `request.name` (see the module docstring)."""
    check_name(request.name)
    source = request.source.expanduser().resolve()
    manifest = _hash(source, progress)
    tags = _version_tags(request, manifest, source)
    if not request.force:
        _refuse_duplicate(client, request.name, manifest)  # early: before copying gigabytes
    run = _start_run(client, location, request, manifest)
    try:
        if request.copy:
            _upload(client, run, source, manifest, progress)
            target = f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
        else:
            target = source.as_uri()
        with mlflow_errors(f"import of {request.name}"):
            client.log_text(run.info.run_id, request.card.model_dump_json(indent=2), CARD_FILENAME)
            client.log_text(run.info.run_id, manifest.model_dump_json(indent=2), MANIFEST_FILENAME)
        _report(progress, "Registering", 0, 1)
        with location.lock(), mlflow_errors(f"import of {request.name}"):
            if not request.force:
                _refuse_duplicate(client, request.name, manifest)
            _ensure_registered_model(client, request.name)
            mv = client.create_model_version(
                request.name, target, run_id=run.info.run_id, tags=tags, description=_description(request)
            )
    except BaseException:
        _abandon(client, run)
        raise
    _report(progress, "Registering", 1, 1)
    _finish(client, run, int(mv.version))
    return version_info(mv, {})


def prune_failed_imports(client: MlflowClient, older_than_s: float = 24 * 3600) -> int:
    """Delete import runs that never registered a version (killed imports); returns how many.

    Only runs started more than `older_than_s` ago: a younger one may be an import in progress.
    """
    cutoff_ms = (time.time() - older_than_s) * 1000
    with mlflow_errors("pruning failed imports"):
        experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            return 0
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{TAG_IMPORT_STATE}` = 'pending'"
        )
        stale = [
            run
            for run in runs
            if run.info.status == "RUNNING"
            and run.info.start_time <= cutoff_ms
            and not _has_version(client, run)
        ]
        for run in stale:
            _abandon(client, run)
    return len(stale)


def _hash(source: Path, progress: ProgressFn | None) -> Manifest:
    if progress is None:
        return build_manifest(source)
    total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        progress("Hashing", done, total)

    progress("Hashing", 0, total)
    return build_manifest(source, on_bytes)


def _version_tags(request: ImportRequest, manifest: Manifest, source: Path) -> dict[str, str]:
    tags = {
        TAG_CONTENT_SHA: manifest.content_sha256,
        TAG_MANIFEST: manifest.model_dump_json(),
        TAG_CARD: request.card.model_dump_json(exclude_defaults=True),
        TAG_STORAGE: str(Storage.COPY if request.copy else Storage.REFERENCE),
        TAG_ORIGIN: request.origin or f"folder:{source}",
    }
    for key in (TAG_MANIFEST, TAG_CARD):
        if len(tags[key]) > _MAX_TAG_CHARS:
            raise ValidationError(
                f"the {key.removeprefix('twinserve.')} of {source} is {len(tags[key])} characters as JSON; "
                f"MLflow keeps at most {_MAX_TAG_CHARS} in a version tag"
            )
    return tags


def _refuse_duplicate(client: MlflowClient, name: str, manifest: Manifest) -> None:
    with mlflow_errors(f"model {name}"):
        found = client.search_model_versions(
            f"name = '{name}' and tag.`{TAG_CONTENT_SHA}` = '{manifest.content_sha256}'"
        )
    if found:
        existing = version_info(found[0], {})
        raise DuplicateImportError(
            f"these weights (sha256 {manifest.content_sha256[:12]}…) are already {existing.uri}; "
            "pass --force (force=True) to register them again",
            existing,
        )


def _start_run(
    client: MlflowClient, location: StoreLocation, request: ImportRequest, manifest: Manifest
) -> Run:
    with mlflow_errors(f"import of {request.name}"):
        experiment_id = _experiment_id(client, location)
        return client.create_run(
            experiment_id,
            run_name=f"import {request.name}",
            tags={
                TAG_IMPORT_STATE: "pending",
                TAG_MODEL: request.name,
                TAG_CONTENT_SHA: manifest.content_sha256,
                "mlflow.user": current_user(),
            },
        )


def _experiment_id(client: MlflowClient, location: StoreLocation) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return str(experiment.experiment_id)
    from mlflow.exceptions import MlflowException

    with location.lock():
        try:
            return str(
                client.create_experiment(EXPERIMENT_NAME, artifact_location=location.artifact_location)
            )
        except MlflowException as exc:  # created meanwhile by a process on another machine
            experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
            if experiment is None:
                raise exc from None
            return str(experiment.experiment_id)


def _upload(
    client: MlflowClient, run: Run, source: Path, manifest: Manifest, progress: ProgressFn | None
) -> None:
    total, done = manifest.total_bytes, 0
    _report(progress, "Copying", 0, total)
    with mlflow_errors(f"copying {source} into the registry"):
        for rel, entry in manifest.files.items():
            parent = Path(MODEL_ARTIFACT_PATH, rel).parent.as_posix()
            client.log_artifact(run.info.run_id, str(source / rel), artifact_path=parent)
            done += entry.size
            _report(progress, "Copying", done, total)
    copied = local_path(f"{run.info.artifact_uri}/{MODEL_ARTIFACT_PATH}")
    if copied is not None:  # a local copy is cheap to re-read: prove it before registering it
        verify_folder(copied, manifest)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="Registered by twinserve.")
        except MlflowException as create_exc:
            if create_exc.error_code != "RESOURCE_ALREADY_EXISTS":  # created meanwhile elsewhere
                raise


def _finish(client: MlflowClient, run: Run, version: int) -> None:
    # the version exists now; a failure here must not take it back, so it is not fatal
    try:
        client.set_tag(run.info.run_id, TAG_VERSION, str(version))
        client.set_tag(run.info.run_id, TAG_IMPORT_STATE, "done")
        client.set_terminated(run.info.run_id, "FINISHED")
    except Exception:  # noqa: S110 - the run merely stays RUNNING; prune_failed_imports ignores it
        pass


def _abandon(client: MlflowClient, run: Run) -> None:
    # best effort: the store may be the thing that failed
    try:
        client.set_tag(run.info.run_id, TAG_IMPORT_STATE, "failed")
        client.set_terminated(run.info.run_id, "FAILED")
        client.delete_run(run.info.run_id)
    except Exception:  # noqa: S110
        pass
    folder = local_path(run.info.artifact_uri)
    if folder is not None and folder.name == "artifacts":
        shutil.rmtree(folder.parent, ignore_errors=True)  # the run's own folder


def _has_version(client: MlflowClient, run: Run) -> bool:
    return bool(client.search_model_versions(f"run_id = '{run.info.run_id}'"))


def _description(request: ImportRequest) -> str:
    base = f" (base model {request.card.base_model})" if request.card.base_model else ""
    return f"Imported by twinserve from {request.origin or request.source}{base}."


def _report(progress: ProgressFn | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


def current_user() -> str:
    """The operating-system user, for run authors and alias moves."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (some containers)
        return "unknown"
