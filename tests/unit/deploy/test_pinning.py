"""Pinning a model reference at deploy time (no processes: registry metadata only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir
from twinserve.deploy.pinning import pin_config, pin_model
from twinserve.deploy.spec import EndpointConfig
from twinserve.errors import NotFoundError, ValidationError
from twinserve.registry.store import ModelRegistry


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    """A registry of its own (the one `ModelRegistry()` finds), with two versions: champion = 1."""
    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    monkeypatch.setenv("TWINSERVE_REGISTRY_URI", uri)
    monkeypatch.setenv("TWINSERVE_REGISTRY_ARTIFACTS", artifacts)
    reg = ModelRegistry()
    for seed in (0, 1):
        reg.import_model("twin", tiny_llama_dir(tmp_path / f"v{seed}", seed=seed), copy=False)
    reg.set_alias("twin", "champion", 1)
    return reg


def test_an_alias_pins_its_version_and_hash(registry: ModelRegistry) -> None:
    pin = pin_model("models:/twin@champion")
    v1 = registry.get_version("twin", 1)
    assert (pin.kind, pin.name, pin.version) == ("registry", "twin", 1)
    assert pin.content_sha256 == v1.content_sha256 and pin.location == v1.source
    assert pin.reference == "models:/twin@champion"
    assert pin.load_ref == "models:/twin/1"  # what replicas load: never the moving alias


def test_a_moved_alias_changes_a_new_pin_but_not_an_old_one(registry: ModelRegistry) -> None:
    before = pin_model("models:/twin@champion")
    registry.set_alias("twin", "champion", 2)
    after = pin_model("models:/twin@champion")
    assert (before.version, after.version) == (1, 2)
    assert before.load_ref == "models:/twin/1"
    assert before.content_sha256 != after.content_sha256


def test_latest_is_pinned_to_a_number(registry: ModelRegistry) -> None:
    assert pin_model("models:/twin/latest").load_ref == "models:/twin/2"


def test_unknown_references_fail_before_anything_is_deployed(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="alias"):
        pin_model("models:/twin@nope")
    with pytest.raises(NotFoundError):
        pin_model("models:/twin/9")
    with pytest.raises(NotFoundError, match="no such folder"):
        pin_model(str(tmp_path / "missing"))
    with pytest.raises(ValidationError):
        pin_model("models:/")


def test_hub_and_folder_pins(tmp_path: Path) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    hub = pin_model(f"hf://HuggingFaceTB/SmolLM2-135M-Instruct@{sha}")  # a full sha: no network
    assert (hub.kind, hub.name, hub.revision) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct", sha)
    assert hub.load_ref == f"hf://HuggingFaceTB/SmolLM2-135M-Instruct@{sha}"
    folder = pin_model(str(tmp_path))
    assert (folder.kind, folder.load_ref) == ("folder", str(tmp_path.resolve()))


def test_pin_config_keeps_a_pin_only_while_the_reference_is_the_same(registry: ModelRegistry) -> None:
    config = EndpointConfig.model_validate(
        {
            "name": "e",
            "variants": [
                {"name": "a", "model": "models:/twin@champion"},
                {"name": "b", "model": "models:/twin/2"},
            ],
        }
    )
    pinned = pin_config(config)
    assert [v.pinned.version for v in pinned.variants if v.pinned] == [1, 2]
    registry.set_alias("twin", "champion", 2)
    again = pin_config(pinned)  # same references: the pins stay (an alias move changes nothing)
    assert again.variants[0].pinned == pinned.variants[0].pinned
    changed = pinned.model_copy(
        update={
            "variants": [
                pinned.variants[0].model_copy(update={"model": "models:/twin/1"}),
                pinned.variants[1],
            ]
        }
    )
    repinned = pin_config(changed)
    assert repinned.variants[0].pinned is not None
    assert repinned.variants[0].pinned.reference == "models:/twin/1"


def test_a_pinned_config_survives_the_state_round_trip(registry: ModelRegistry) -> None:
    config = pin_config(EndpointConfig.single("e", "models:/twin@champion"))
    back = EndpointConfig.from_dict(config.to_dict())
    assert back.variants[0].pinned == config.variants[0].pinned
    assert back.variants[0].load_ref == "models:/twin/1"
