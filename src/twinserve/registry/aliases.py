"""Move an alias and write its history record as one step, on every backend.

MLflow keeps no alias history, so each move is also a registered-model tag
(`twinserve.alias_move.<time>-<rand>`). MLflow's client sets the alias and the tag in two
calls, each its own transaction: an error or a crash between them would leave an alias
moved with no record (or, recording first, a record of a move that never happened).

- **SQL stores** (SQLite, PostgreSQL: every store twinserve creates): both rows are written
  in one transaction of the store's own session (MLflow's ORM rows, as its own
  `set_registered_model_alias` / `set_registered_model_tag` write them). The database commits
  both or neither, whatever fails, a killed process included. The registered model's row is
  locked first (`SELECT … FOR UPDATE` on PostgreSQL; SQLite writers already queue on the
  store's file lock), so the recorded `from` version is the one actually replaced even when
  two operators promote at once.
- **Other stores** (an MLflow server over REST) offer no transaction to join: the alias is
  moved, then the record written, and if recording fails the alias is put back
  (compensation). Only a process killed between the two calls can still part them there.

Why not compensation everywhere: it cannot cover a crash, and its own undo can fail. The
transaction reaches into MLflow's SQL store, which is not a public API: `sql_store` checks
for what it needs and otherwise falls back to compensation (with a warning), so an MLflow
upgrade that moves those internals makes moves less atomic, never broken.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twinserve.errors import NotFoundError, ValidationError
from twinserve.registry.importer import current_user
from twinserve.registry.versions import AliasMove, aliases_of

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

HISTORY_TAG_PREFIX = "twinserve.alias_move."
# the record is a registered-model tag: MLflow's SQL schema holds 5000 characters per value
# (PostgreSQL enforces it, SQLite does not); a reason this long fits with the rest of the record
MAX_REASON_CHARS = 4000
_STORE_NEEDS = (
    "ManagedSessionMaker",
    "_get_registered_model",
    "_get_registered_model_alias",
    "_get_sql_model_version",
)


@dataclass(frozen=True)
class _Found:
    """What the transaction found: the move it made (or would have), and whether it moved."""

    move: AliasMove
    moved: bool


def check_reason(reason: str | None) -> None:
    """ValidationError for a reason too long to record (checked before anything is written)."""
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise ValidationError(
            f"the reason of an alias move is {len(reason)} characters; at most {MAX_REASON_CHARS} are recorded"
        )


def move_alias(
    client: MlflowClient, name: str, alias: str, to_version: int | None, reason: str | None
) -> AliasMove:
    """Point `alias` of `name` at `to_version` (None: delete it) and record the move, both or neither.

    Nothing is written when the alias already points there; NotFoundError when deleting an
    alias that does not exist. MLflow errors are the caller's to translate.
    """
    store = sql_store(client)
    if store is not None:
        found = _in_one_transaction(store, name, alias, to_version, reason)
    else:
        found = _with_compensation(client, name, alias, to_version, reason)
    if to_version is None and not found.moved:
        raise NotFoundError(f"model {name!r} has no alias {alias!r}")
    return found.move


def sql_store(client: MlflowClient) -> Any | None:
    """MLflow's SQL registry store behind `client`, if it has what one transaction needs."""
    try:
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

        store = client._get_registry_client().store
    except Exception:  # no SQLAlchemy installed, or a client without that accessor
        return None
    if not isinstance(store, SqlAlchemyStore):
        return None
    missing = [attr for attr in _STORE_NEEDS if not hasattr(store, attr)]
    if missing:
        log.warning(
            "this MLflow's SQL store lacks %s: alias moves fall back to compensation", ", ".join(missing)
        )
        return None
    return store


def history_record(move: AliasMove) -> tuple[str, str]:
    """The tag (key, value) recording `move`."""
    # time first so tags sort chronologically; the random tail keeps same-instant moves apart
    key = f"{HISTORY_TAG_PREFIX}{int(move.time.timestamp() * 1e6):017d}-{secrets.token_hex(3)}"
    return key, move.model_dump_json(exclude_none=True)


def _new_move(alias: str, before: int | None, to_version: int | None, reason: str | None) -> AliasMove:
    return AliasMove(
        alias=alias, from_version=before, to_version=to_version, user=current_user(),
        time=datetime.now(UTC), reason=reason,
    )  # fmt: skip


def _in_one_transaction(
    store: Any, name: str, alias: str, to_version: int | None, reason: str | None
) -> _Found:
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModelAlias, SqlRegisteredModelTag

    with store.ManagedSessionMaker(read_only=False) as session:  # commits on exit, rolls back on error
        model = store._get_registered_model(session, name)
        session.refresh(model, with_for_update=True)  # concurrent movers of `name` queue here
        current = store._get_registered_model_alias(session, name, alias)
        before = int(current.version) if current is not None else None
        found = _Found(_new_move(alias, before, to_version, reason), moved=before != to_version)
        if not found.moved:
            return found
        if to_version is None:
            session.delete(current)
        else:
            version = store._get_sql_model_version(session, name, to_version)
            session.merge(
                SqlRegisteredModelAlias(**_workspace(version), name=name, alias=alias, version=to_version)
            )
        key, value = history_record(found.move)
        session.merge(SqlRegisteredModelTag(**_workspace(model), name=name, key=key, value=value))
        session.flush()  # a refused write fails here, inside the transaction it undoes
    return found


def _with_compensation(
    client: MlflowClient, name: str, alias: str, to_version: int | None, reason: str | None
) -> _Found:
    before = aliases_of(client.get_registered_model(name)).get(alias)
    found = _Found(_new_move(alias, before, to_version, reason), moved=before != to_version)
    if not found.moved:
        return found
    _point(client, name, alias, to_version)
    try:
        client.set_registered_model_tag(name, *history_record(found.move))
    except BaseException as exc:
        try:
            _point(client, name, alias, before)  # no move without its record
        except Exception as undo:
            exc.add_note(f"putting alias {alias!r} of {name!r} back to {before} failed too: {undo}")
        raise
    return found


def _point(client: MlflowClient, name: str, alias: str, version: int | None) -> None:
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(version))


def _workspace(row: Any) -> dict[str, Any]:
    # MLflow 3.x rows carry a workspace; copy the parent's, as MLflow's own writes do
    return {"workspace": row.workspace} if hasattr(row, "workspace") else {}
