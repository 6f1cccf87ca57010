"""An alias move and its history record are one step, on SQLite and on PostgreSQL.

The history write is made to fail for real: a trigger in the database refuses it, after the
alias row was written in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy

from tests.factories import tiny_llama_dir
from tests.postgres import postgres_server
from twinserve.errors import TwinserveError, ValidationError
from twinserve.registry.store import ModelRegistry

REFUSALS = {  # a real failure inside the transaction: the database itself refuses the record
    "sqlite": (
        """CREATE TRIGGER refuse_history BEFORE INSERT ON registered_model_tags
        WHEN NEW.key LIKE 'twinserve.alias_move.%'
        BEGIN SELECT RAISE(ABORT, 'history is read-only'); END""",
    ),
    "postgresql": (
        """CREATE OR REPLACE FUNCTION refuse_history() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN RAISE EXCEPTION 'history is read-only'; END $$""",
        """CREATE TRIGGER refuse_history BEFORE INSERT ON registered_model_tags FOR EACH ROW
        WHEN (NEW.key LIKE 'twinserve.alias_move.%') EXECUTE FUNCTION refuse_history()""",
    ),
}
ACCEPTS = {
    "sqlite": ("DROP TRIGGER refuse_history",),
    "postgresql": ("DROP TRIGGER refuse_history ON registered_model_tags",),
}


@dataclass
class Model:
    """A registered model with two versions and `champion` on 1, on one backend."""

    registry: ModelRegistry
    name: str
    backend: str

    def refuse_history(self, refuse: bool = True) -> None:
        """Make the database refuse (or accept again) every new alias-history record."""
        engine = sqlalchemy.create_engine(self.registry.location.uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.begin() as conn:
                for sql in (REFUSALS if refuse else ACCEPTS)[self.backend]:
                    conn.execute(sqlalchemy.text(sql))
        finally:
            engine.dispose()

    def champion(self) -> int:
        return self.registry.get_version(self.name, alias="champion").version


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:  # skips where PostgreSQL is missing, fails under CI=true
        yield url


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [tiny_llama_dir(root / f"m{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture(params=["sqlite", "postgresql"])
def model(request: pytest.FixtureRequest, tmp_path: Path, models: list[Path]) -> Model:
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("postgres_url")  # one server for the module
    registry = ModelRegistry(uri, str(tmp_path / "artifacts"))
    name = f"twin-{request.node.originalname.removeprefix('test_')[:40]}"
    for folder in models:
        registry.import_model(name, folder)
    registry.set_alias(name, "champion", 1, reason="baseline")
    return Model(registry, name, request.param)


def test_a_refused_record_leaves_the_alias_where_it_was(model: Model) -> None:
    registry, name = model.registry, model.name
    model.refuse_history()
    try:
        with pytest.raises(TwinserveError, match="history is read-only"):
            registry.set_alias(name, "champion", 2, reason="promote")
        assert model.champion() == 1
        with pytest.raises(TwinserveError, match="history is read-only"):
            registry.set_alias(name, "challenger", 2)  # a new alias: not created either
        with pytest.raises(TwinserveError, match="history is read-only"):
            registry.delete_alias(name, "champion", reason="retire")
        assert model.champion() == 1 and registry.get_version(name, 2).aliases == []
    finally:
        model.refuse_history(False)
    assert [(m.from_version, m.to_version) for m in registry.alias_history(name)] == [(None, 1)]
    # the normal path moves and records together
    move = registry.set_alias(name, "champion", 2, reason="promote")
    assert (move.from_version, move.to_version) == (1, 2) and model.champion() == 2
    gone = registry.delete_alias(name, "champion", reason="retire")
    assert (gone.from_version, gone.to_version) == (2, None)
    history = registry.alias_history(name, "champion")
    assert [(m.from_version, m.to_version, m.reason) for m in history] == [
        (None, 1, "baseline"),
        (1, 2, "promote"),
        (2, None, "retire"),
    ]


def test_a_reason_too_long_to_record_moves_nothing(model: Model) -> None:
    with pytest.raises(ValidationError, match="at most 4000 are recorded"):
        model.registry.set_alias(model.name, "champion", 2, reason="x" * 6000)  # PostgreSQL holds 5000
    assert model.champion() == 1 and len(model.registry.alias_history(model.name)) == 1


def test_without_a_transaction_a_failed_record_puts_the_alias_back(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path for stores without SQL (an MLflow server): move, record, undo on failure."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    # fault injection at MLflow's boundary: an MLflow without the internals one transaction
    # needs (so the fallback runs), and a history write that then fails
    monkeypatch.delattr(SqlAlchemyStore, "_get_registered_model_alias")

    def refuse(*args: object, **kwargs: object) -> None:
        raise MlflowException("the tracking server is gone")

    monkeypatch.setattr(model.registry.client, "set_registered_model_tag", refuse)
    with pytest.raises(TwinserveError, match="the tracking server is gone"):
        model.registry.set_alias(model.name, "champion", 2, reason="promote")
    monkeypatch.undo()
    assert model.champion() == 1 and len(model.registry.alias_history(model.name)) == 1
