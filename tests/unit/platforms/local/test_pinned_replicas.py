"""Models are pinned at deploy time: promoting another version never changes a running
endpoint (not even its new replicas) until an explicit `update` (real processes, tiny models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir
from twinserve.deploy.spec import EndpointConfig
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.registry.store import ModelRegistry


@pytest.fixture
def registry(manager: LocalPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    """Versions 1 and 2 of `twin-model` (other weights), champion = 1; replicas inherit the env."""
    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    monkeypatch.setenv("TWINSERVE_REGISTRY_URI", uri)
    monkeypatch.setenv("TWINSERVE_REGISTRY_ARTIFACTS", artifacts)
    reg = ModelRegistry()
    for seed in (0, 1):
        reg.import_model("twin-model", tiny_llama_dir(tmp_path / f"v{seed}", seed=seed), copy=False)
    reg.set_alias("twin-model", "champion", 1)
    return reg


def _config() -> EndpointConfig:
    return EndpointConfig.model_validate(
        {
            "name": "pinned",
            "startup_timeout_s": 240,
            "drain_timeout_s": 2,
            "variants": [
                {"model": "models:/twin-model@champion", "dtype": "float32", "device": "cpu", "threads": 1}
            ],
        }
    )


def test_a_promotion_reaches_an_endpoint_only_through_update(
    manager: LocalPlatform, registry: ModelRegistry
) -> None:
    ep = manager.create(_config(), controller=False)
    pin = ep.config.variants[0].pinned
    assert pin is not None and (pin.reference, pin.version) == ("models:/twin-model@champion", 1)
    assert pin.content_sha256 == registry.get_version("twin-model", 1).content_sha256
    assert [r.model_version for r in ep.replicas] == ["models:/twin-model/1"]

    registry.set_alias("twin-model", "champion", 2)  # promoted while the endpoint runs
    ep = manager.scale("pinned", 2)  # a scale-out after the promotion
    assert sorted(r.model_version or "" for r in ep.replicas) == ["models:/twin-model/1"] * 2
    assert ep.config.variants[0].pinned == pin

    ep = manager.update("pinned", ep.config_with_model("models:/twin-model@champion"))
    assert ep.generation == 2
    new_pin = ep.config.variants[0].pinned
    assert new_pin is not None and new_pin.version == 2
    assert ep.config.variants[0].model == "models:/twin-model@champion"  # the reference as given
    assert sorted(r.model_version or "" for r in ep.replicas) == ["models:/twin-model/2"] * 2
