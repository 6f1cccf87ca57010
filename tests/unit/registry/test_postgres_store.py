"""The team backend: the same registry on a real PostgreSQL server started on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir
from tests.postgres import postgres_available, postgres_server
from twinserve.errors import NotReadyError, ServerError
from twinserve.registry.promotion import promote, rollback
from twinserve.registry.store import ModelRegistry

pytestmark = pytest.mark.skipif(
    not postgres_available(), reason="PostgreSQL binaries not installed (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
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
    from twinserve.server.process import free_port

    registry = ModelRegistry(f"postgresql://nobody@127.0.0.1:{free_port()}/registry", str(tmp_path))
    with pytest.raises((NotReadyError, ServerError)) as info:
        registry.list_models()
    assert "127.0.0.1" in info.value.message and "Traceback" not in info.value.message
