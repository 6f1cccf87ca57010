"""Promotion gate and rollback against a real SQLite MLflow store with tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir
from twinserve.errors import NotFoundError, ValidationError
from twinserve.registry.promotion import previous_holder, promote, rollback
from twinserve.registry.store import ModelRegistry
from twinserve.registry.versions import AliasMove


@pytest.fixture()
def registry(tmp_path: Path) -> ModelRegistry:
    """Three versions of `twin` (different random weights), with metrics."""
    reg = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"))
    for seed, metrics in enumerate(
        [
            {"rougeL": 0.36, "toxicity": 0.05},
            {"rougeL": 0.40, "toxicity": 0.04},
            {"rougeL": 0.38, "toxicity": 0.02},
        ]
    ):
        info = reg.import_model("twin", tiny_llama_dir(tmp_path / f"m{seed}", seed=seed))
        reg.log_metrics("twin", info.version, metrics)
    return reg


def test_a_passing_gate_moves_the_alias_and_records_why(registry: ModelRegistry) -> None:
    result = promote(registry, "twin", 1, "champion", ["rougeL>=0.35", "toxicity<=0.1"])
    assert result.promoted and result.gate.passed
    assert registry.get_version("twin", alias="champion").version == 1
    move = registry.alias_history("twin", "champion")[-1]
    assert (move.from_version, move.to_version) == (None, 1) and "rougeL>=0.35" in (move.reason or "")


def test_a_failing_gate_leaves_the_alias_alone(registry: ModelRegistry) -> None:
    promote(registry, "twin", 1, "champion", ["rougeL>=0.35"])
    result = promote(registry, "twin", 3, "champion", ["rougeL>=0.39"])
    assert not result.promoted and "rougeL = 0.38" in result.gate.reason()
    assert registry.get_version("twin", alias="champion").version == 1


def test_compare_to_refuses_a_candidate_worse_than_the_holder(registry: ModelRegistry) -> None:
    promote(registry, "twin", 2, "champion", ["rougeL>=0.35"])
    # v3 passes the thresholds but is worse than v2 on rougeL (and better on toxicity)
    result = promote(
        registry, "twin", 3, "champion", ["rougeL>=0.35", "toxicity<=0.1"], compare_to="champion"
    )
    assert not result.promoted and result.baseline_version == 2
    assert [c.check for c in result.gate.failures] == ["rougeL not worse than champion (v2)"]
    assert registry.get_version("twin", alias="champion").version == 2
    # compared on toxicity alone, v3 is better: promoted
    assert promote(registry, "twin", 3, "champion", ["toxicity<=0.1"], compare_to="champion").promoted


def test_dry_run_and_bad_input(registry: ModelRegistry) -> None:
    assert not promote(registry, "twin", 1, "champion", ["rougeL>=0.1"], dry_run=True).promoted
    with pytest.raises(NotFoundError):
        registry.get_version("twin", alias="champion")
    with pytest.raises(ValidationError, match="bad requirement"):
        promote(registry, "twin", 1, "champion", ["rougeL=>0.1"])
    with pytest.raises(NotFoundError):
        promote(registry, "twin", 9, "champion", ["rougeL>=0.1"])
    with pytest.raises(ValidationError, match="--compare-to needs"):
        promote(registry, "twin", 1, "champion", [], compare_to="champion")


def test_rollback_walks_back_through_promotions(registry: ModelRegistry) -> None:
    for version in (1, 2, 3):
        assert promote(registry, "twin", version, "champion", []).promoted
    assert rollback(registry, "twin", "champion").to_version == 2
    assert rollback(registry, "twin", "champion").to_version == 1  # two back, not back and forth
    with pytest.raises(ValidationError, match="no earlier holder"):
        rollback(registry, "twin", "champion")
    with pytest.raises(NotFoundError, match="no alias"):
        rollback(registry, "twin", "staging")


def test_previous_holder_skips_rollbacks() -> None:
    def move(a: int | None, b: int, reason: str = "promote") -> AliasMove:
        return AliasMove(
            alias="c", from_version=a, to_version=b, user="u", time="2026-01-01T00:00:00Z", reason=reason
        )

    history = [move(None, 1), move(1, 2), move(2, 3), move(3, 2, "rollback: from v3")]
    assert previous_holder(history, 2) == 1
    assert previous_holder(history + [move(2, 3)], 3) == 2


def test_promote_and_rollback_commands(registry: ModelRegistry) -> None:
    from typer.testing import CliRunner

    from twinserve.cli.main import app

    uri = ["--uri", registry.location.uri]
    runner = CliRunner()
    ok = runner.invoke(app, ["registry", "promote", "twin", "2", "--require", "rougeL>=0.35", *uri])
    assert ok.exit_code == 0, ok.output
    assert "promoted" in ok.output
    refused = runner.invoke(
        app,
        ["registry", "promote", "twin", "3", "--require", "rougeL>=0.35", "--compare-to", "champion", *uri],
    )
    assert refused.exit_code == 1 and "not promoted" in refused.output and "worse than 0.4" in refused.output
    bad = runner.invoke(app, ["registry", "promote", "twin", "3", "--require", "rougeL=>1", *uri])
    assert bad.exit_code == 1 and "bad requirement" in bad.output
    promoted = runner.invoke(app, ["registry", "promote", "twin", "3", *uri])
    assert promoted.exit_code == 0
    back = runner.invoke(app, ["registry", "rollback", "twin", *uri])
    assert back.exit_code == 0 and "v3 → v2" in back.output
    assert registry.get_version("twin", alias="champion").version == 2
