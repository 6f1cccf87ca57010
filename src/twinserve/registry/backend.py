"""Where the registry's MLflow store is, whether it answers, and what its errors mean to us.

The store is any MLflow tracking URI: by default a SQLite file under TWINSERVE_HOME (no
server to start), for teams PostgreSQL or an MLflow server (`TWINSERVE_REGISTRY_URI`).
MLflow retries an unreachable database for about two minutes before failing with a
traceback, so the store is probed once, briefly, before MLflow sees it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from twinserve.config import Settings, get_settings
from twinserve.errors import NotFoundError, ServerError, TwinserveError, UnreachableError, ValidationError
from twinserve.registry._files import file_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient

_PROBE_TIMEOUT_S = 5
_DB_SCHEMES = ("postgresql", "mysql", "mssql")
_HTTP_SCHEMES = ("http", "https")
# MLflow sends usage telemetry by default; a registry of private models should not phone home
# (set MLFLOW_DISABLE_TELEMETRY=false to allow it). Set before anything imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's first use of a database logs its migrations at INFO; they are not news to our users
_QUIET_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.sqlalchemy_store", "alembic.runtime.migration")


@dataclass(frozen=True)
class StoreLocation:
    """A resolved store: the MLflow URI and the artifact root new runs write to."""

    uri: str
    artifact_location: str | None
    sqlite_path: Path | None  # set for SQLite stores: the file, which also anchors the lock

    @property
    def is_local_sqlite(self) -> bool:
        return self.sqlite_path is not None

    @contextlib.contextmanager
    def lock(self, suffix: str = "") -> Iterator[None]:
        """Serialize writers of a SQLite store across processes; databases with servers need none.

        Locks are per open file, so one process must not nest two `lock()` of the same suffix.
        """
        if self.sqlite_path is None:
            yield
            return
        with file_lock(self.sqlite_path.with_name(f"{self.sqlite_path.name}{suffix}.lock")):
            yield


def locate_store(
    uri: str | None = None, artifact_location: str | None = None, settings: Settings | None = None
) -> StoreLocation:
    """The store to use: explicit arguments, then the environment, then the SQLite default."""
    settings = settings or get_settings()
    home = settings.home
    uri = uri or settings.registry_uri or f"sqlite:///{home / 'registry' / 'mlflow.db'}"
    uri = _with_installed_driver(uri)
    artifact_location = artifact_location or settings.registry_artifacts
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    sqlite_path = _sqlite_path(uri) if scheme == "sqlite" else None
    if artifact_location is None and scheme not in (*_HTTP_SCHEMES, "databricks"):
        # beside a SQLite file; for a shared database, set TWINSERVE_REGISTRY_ARTIFACTS (e.g. s3://…)
        root = sqlite_path.parent if sqlite_path is not None else home / "registry"
        artifact_location = (root / "artifacts").resolve().as_uri()
    elif artifact_location is not None and "://" not in artifact_location:
        artifact_location = Path(artifact_location).expanduser().resolve().as_uri()
    return StoreLocation(uri, artifact_location, sqlite_path)


def probe(location: StoreLocation) -> None:
    """UnreachableError (with the URI and the reason) unless the store answers within seconds."""
    uri = location.uri
    scheme = urlparse(uri).scheme.split("+", 1)[0]
    try:
        if location.sqlite_path is not None:
            location.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(location.sqlite_path, timeout=_PROBE_TIMEOUT_S)) as conn:
                conn.execute("select 1")
        elif scheme in _DB_SCHEMES:
            _probe_database(uri)
        elif scheme in _HTTP_SCHEMES:
            _probe_server(uri)
    except TwinserveError:
        raise
    except Exception as exc:  # drivers raise their own types; the user needs one message
        raise UnreachableError(f"model registry store {redact(uri)} is unreachable: {_reason(exc)}") from exc


def connect(location: StoreLocation) -> MlflowClient:
    """An MlflowClient on the store, created (and migrated on first use) under the store's lock."""
    probe(location)
    from mlflow import MlflowClient

    with _quiet_mlflow(), location.lock(), mlflow_errors(f"model registry store {redact(location.uri)}"):
        client = MlflowClient(tracking_uri=location.uri, registry_uri=location.uri)
        # touch both stores now: a fresh database is migrated here, once, while we hold the lock
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    return client


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Translate MLflow and database exceptions into twinserve errors (`what` names the object)."""
    try:
        yield
    except TwinserveError:
        raise
    except Exception as exc:
        raise translate(exc, what) from exc


def translate(exc: Exception, what: str) -> TwinserveError:
    """The twinserve error for an exception raised by MLflow or its database driver."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = exc.error_code
        if code == "RESOURCE_DOES_NOT_EXIST":
            return NotFoundError(f"{what}: {exc.message}")
        if code in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"):
            return ValidationError(f"{what}: {exc.message}")
        return ServerError(f"{what}: {exc.message}")
    module = type(exc).__module__
    if module.startswith(("sqlalchemy", "sqlite3", "psycopg", "requests", "urllib3")):
        return UnreachableError(f"{what}: the store failed: {_reason(exc)}")
    return ServerError(f"{what}: {type(exc).__name__}: {exc}")


def redact(uri: str) -> str:
    """The URI without its password, for messages and logs."""
    parsed = urlparse(uri)
    if parsed.password is None:
        return uri
    return uri.replace(f":{parsed.password}@", ":***@", 1)


def local_path(uri: str) -> Path | None:
    """The local path of a `file:` URI or plain path; None for remote artifact stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _sqlite_path(uri: str) -> Path:
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    if not path or path == ":memory:":
        raise ValidationError(f"registry URI {uri!r}: a SQLite store needs a file (sqlite:////abs/path.db)")
    return Path(unquote(path)).expanduser().resolve()


def _with_installed_driver(uri: str) -> str:
    # SQLAlchemy's `postgresql://` means psycopg2; where only psycopg 3 is installed, use it
    if not uri.startswith("postgresql://"):
        return uri
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + uri.removeprefix("postgresql://")
    return uri


def _probe_database(uri: str) -> None:
    import sqlalchemy

    connect_args = {"connect_timeout": _PROBE_TIMEOUT_S} if uri.startswith(("postgresql", "mysql")) else {}
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    finally:
        engine.dispose()


def _probe_server(uri: str) -> None:
    import httpx

    response = httpx.get(uri.rstrip("/") + "/health", timeout=_PROBE_TIMEOUT_S)
    if response.status_code >= 500:
        raise UnreachableError(f"MLflow server {redact(uri)} answered {response.status_code} on /health")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"the database driver is not installed ({exc.name}); pip install it"
    # database drivers put the useful line first and SQL context after it
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
