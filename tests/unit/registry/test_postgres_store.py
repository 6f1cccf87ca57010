"""The team backend: the same registry on a real PostgreSQL server started on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir
from tests.postgres import postgres_server
from twinserve.errors import UnreachableError
from twinserve.registry.promotion import promote, rollback
from twinserve.registry.store import ModelRegistry


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:  # skips where PostgreSQL is missing, fails under CI=true
        yield url


def test_import_promote_resolve_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    registry = ModelRegistry(postgres_url, str(tmp_path / "artifacts"))
    for seed in (0, 1):
        info = registry.import_model("llm-twin", tiny_llama_dir(tmp_path / f"m{seed}", seed=seed))
        registry.log_metrics("llm-twin", info.version, {"rougeL": 0.3 + seed / 10})
    assert promote(registry, "llm-twin", 1, "champion", ["rougeL>=0.25"]).promoted
    assert promote(registry, "llm-twin", 2, "champion", ["rougeL>=0.25"], compare_to="champion").promoted
    # a second client (another team member's process) sees the same store
    other = ModelRegistry(postgres_url, str(tmp_path / "artifacts"))
    resolved = other.resolve("models:/llm-twin@champion")
    assert resolved.version == 2 and (resolved.path / "config.json").exists()
    assert [m.to_version for m in other.alias_history("llm-twin", "champion")] == [1, 2]
    assert rollback(other, "llm-twin", "champion").to_version == 1


def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    """No server on the port: UnreachableError (503, retryable) naming the store, no traceback."""
    from twinserve.server.process import free_port

    port = free_port()
    registry = ModelRegistry(f"postgresql://nobody@127.0.0.1:{port}/registry", str(tmp_path))
    with pytest.raises(UnreachableError) as info:
        registry.list_models()
    assert info.value.status_code == 503
    assert re.match(
        rf"model registry store \S+://nobody@127\.0\.0\.1:{port}/registry is unreachable: ",
        info.value.message,
    )
    assert "OperationalError" in info.value.message and "Traceback" not in info.value.message
