"""ModelRegistry on a real SQLite MLflow store: imports, hashes, aliases, metrics, resolve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.entities import ViewType

from tests.factories import tiny_llama_dir
from twinserve.errors import ModelLoadError, NotFoundError, ValidationError
from twinserve.registry.card import ModelCard
from twinserve.registry.importer import EXPERIMENT_NAME, DuplicateImportError
from twinserve.registry.resolve import resolve_model
from twinserve.registry.store import ModelRegistry
from twinserve.registry.versions import Storage


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def registry(store_dir: Path) -> ModelRegistry:
    """One migrated store for the module; each test uses its own model names."""
    return ModelRegistry(f"sqlite:///{store_dir / 'mlflow.db'}", str(store_dir / "artifacts"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def registry_env(registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelRegistry]:
    """resolve_model() builds its own ModelRegistry from the environment: point it here."""
    monkeypatch.setenv("TWINSERVE_REGISTRY_URI", registry.location.uri)
    monkeypatch.setenv("TWINSERVE_REGISTRY_ARTIFACTS", registry.location.artifact_location or "")
    yield registry


def test_import_copies_and_records_everything(registry: ModelRegistry, tiny: Path) -> None:
    card = ModelCard(base_model="tiny", prompt_template="alpaca", license="mit")
    info = registry.import_model("copied", tiny, card)
    assert (info.name, info.version, info.storage) == ("copied", 1, Storage.COPY)
    assert info.card == card and info.origin == f"folder:{tiny}"
    assert "config.json" in info.manifest.files and info.manifest.weights == ["model.safetensors"]
    stored = Path(info.source.removeprefix("file://"))
    assert stored.is_dir() and stored != tiny and (stored / "model.safetensors").is_file()
    # the card and manifest are also run artifacts, for people browsing `mlflow ui`
    assert (stored.parent / "twinserve-card.json").is_file()
    assert registry.get_version("copied") == info


def test_content_hash_is_the_loaders_weights_sha256(registry: ModelRegistry, tiny: Path) -> None:
    from twinserve.engine.loader import read_weights, safetensors_files

    info = registry.import_model("hash-check", tiny)
    _, weights_sha256 = read_weights(safetensors_files(tiny))
    assert info.content_sha256 == weights_sha256


def test_pickle_weights_are_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = tiny_llama_dir(tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValidationError, match=r"pickle weights \(pytorch_model.bin\).*safetensors only"):
        registry.import_model("pickled", folder)


@pytest.mark.parametrize(
    ("remove", "fragment"),
    [
        ("config.json", "missing config.json"),
        ("tokenizer.json", "missing a tokenizer"),
        ("model.safetensors", "no safetensors"),
    ],
)
def test_incomplete_folders_are_refused(
    registry: ModelRegistry, tmp_path: Path, remove: str, fragment: str
) -> None:
    folder = tiny_llama_dir(tmp_path / "m")
    (folder / remove).unlink()
    with pytest.raises(ValidationError, match=fragment):
        registry.import_model("incomplete", folder)
    assert "incomplete" not in [m.name for m in registry.list_models()]


def test_duplicate_import_is_refused_unless_forced(registry: ModelRegistry, tiny: Path) -> None:
    first = registry.import_model("dup", tiny)
    with pytest.raises(DuplicateImportError) as info:
        registry.import_model("dup", tiny)
    assert "already models:/dup/1" in info.value.message and "--force" in info.value.message
    assert info.value.existing.version == first.version
    assert registry.import_model("dup", tiny, force=True).version == 2
    assert registry.import_model("dup-other-name", tiny).version == 1  # duplicates are per name


def test_corrupted_and_missing_files_are_named(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = tiny_llama_dir(tmp_path / "m", seed=3)
    info = registry.import_model("corruptible", folder)
    stored = Path(info.source.removeprefix("file://"))
    assert registry.resolve("models:/corruptible/1").path == stored
    weights = stored / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model file corrupted: .*model\.safetensors has sha256"):
        registry.resolve("models:/corruptible/1")
    (stored / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"model file missing: .*tokenizer\.json"):
        registry.resolve("models:/corruptible/1")
    assert registry.resolve("models:/corruptible/1", verify=False).version == 1


def test_reference_in_place(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = tiny_llama_dir(tmp_path / "m", seed=4)
    info = registry.import_model("in-place", folder, copy=False)
    assert info.storage is Storage.REFERENCE and info.source == folder.resolve().as_uri()
    assert registry.resolve("models:/in-place/1").path == folder.resolve()
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(ModelLoadError, match=r"model file changed: .*config\.json"):
        registry.resolve("models:/in-place/1")


def test_aliases_and_history(registry: ModelRegistry, tmp_path: Path) -> None:
    for seed in (10, 11, 12):
        registry.import_model("aliased", tiny_llama_dir(tmp_path / f"m{seed}", seed=seed))
    first = registry.set_alias("aliased", "champion", 1, reason="baseline")
    assert (first.from_version, first.to_version, first.reason) == (None, 1, "baseline")
    registry.set_alias("aliased", "champion", 3, reason="better rougeL")
    registry.set_alias("aliased", "challenger", 2)
    same = registry.set_alias("aliased", "challenger", 2)  # no move, nothing recorded
    assert same.from_version == same.to_version == 2
    assert registry.get_version("aliased", alias="champion").version == 3
    assert registry.get_version("aliased", 3).aliases == ["champion"]
    history = registry.alias_history("aliased")
    assert [(m.alias, m.from_version, m.to_version) for m in history] == [
        ("champion", None, 1),
        ("champion", 1, 3),
        ("challenger", None, 2),
    ]
    assert history[1].reason == "better rougeL" and history[1].user
    assert [m.to_version for m in registry.alias_history("aliased", "champion")] == [1, 3]
    gone = registry.delete_alias("aliased", "challenger", reason="retired")
    assert (gone.from_version, gone.to_version) == (2, None)
    assert registry.alias_history("aliased")[-1].reason == "retired"
    summary = next(m for m in registry.list_models() if m.name == "aliased")
    assert summary.aliases == {"champion": 3} and summary.latest_version == 3


def test_metrics_round_trip(registry: ModelRegistry, tiny: Path) -> None:
    info = registry.import_model("measured", tiny)
    assert info.metrics == {}
    assert registry.log_metrics("measured", 1, {"rougeL": 0.41, "toxicity": 0.02}) == {
        "rougeL": 0.41,
        "toxicity": 0.02,
    }
    registry.log_metrics("measured", 1, {"rougeL": 0.43})  # a new value replaces the old one
    assert registry.get_version("measured", 1).metrics == {"rougeL": 0.43, "toxicity": 0.02}
    with pytest.raises(ValidationError, match="finite"):
        registry.log_metrics("measured", 1, {"rougeL": float("nan")})
    with pytest.raises(ValidationError, match="bad metric"):
        registry.log_metrics("measured", 1, {"bad=name": 1.0})
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.log_metrics("measured", 9, {"rougeL": 0.4})


def test_unknown_name_version_alias(registry: ModelRegistry, tiny: Path) -> None:
    registry.import_model("known", tiny)
    with pytest.raises(NotFoundError, match=r"no registered model 'unknown' \(registered: .*known"):
        registry.get_version("unknown")
    with pytest.raises(NotFoundError, match=r"model 'known' has no version 7 \(versions: 1\)"):
        registry.get_version("known", 7)
    with pytest.raises(NotFoundError, match=r"model 'known' has no alias 'champion' \(aliases: none\)"):
        registry.get_version("known", alias="champion")
    with pytest.raises(NotFoundError, match="no version 4"):
        registry.set_alias("known", "champion", 4)
    with pytest.raises(ValidationError, match="reserved"):
        registry.set_alias("known", "latest", 1)
    with pytest.raises(ValidationError, match="bad model name"):
        registry.import_model("no spaces allowed", tiny)


def test_resolve_model_through_the_registry(registry_env: ModelRegistry, tmp_path: Path) -> None:
    card = ModelCard(prompt_template="chatml", max_input_tokens=64, max_total_tokens=128)
    for seed in (20, 21):
        registry_env.import_model("served", tiny_llama_dir(tmp_path / f"m{seed}", seed=seed), card)
    registry_env.set_alias("served", "champion", 1)
    by_alias = resolve_model("models:/served@champion")
    assert (by_alias.registry_name, by_alias.registry_version, by_alias.revision) == ("served", 1, "1")
    assert by_alias.card == card and by_alias.model_id == "served"
    assert by_alias.content_sha256 == registry_env.get_version("served", 1).content_sha256
    assert (by_alias.path / "config.json").is_file()
    assert resolve_model("models:/served/2").registry_version == 2
    assert resolve_model("models:/served/latest").registry_version == 2
    with pytest.raises(NotFoundError, match="no alias 'gold'"):
        resolve_model("models:/served@gold")
    with pytest.raises(ValidationError, match="expected models:/<name>/<version>"):
        resolve_model("models:/served")


def test_interrupted_import_leaves_no_version(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = tiny_llama_dir(tmp_path / "m", seed=30)

    def interrupt_before_registering(phase: str, done: int, total: int) -> None:
        if phase == "Registering":  # every file is copied by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.import_model("interrupted", folder, progress=interrupt_before_registering)
    with pytest.raises(NotFoundError):
        registry.get_version("interrupted")
    experiment = registry.client.get_experiment_by_name(EXPERIMENT_NAME)
    assert experiment is not None
    runs = registry.client.search_runs(
        [experiment.experiment_id], "tags.`twinserve.model` = 'interrupted'", run_view_type=ViewType.ALL
    )
    assert [(r.info.status, r.info.lifecycle_stage) for r in runs] == [("FAILED", "deleted")]
    assert not Path(runs[0].info.artifact_uri.removeprefix("file://")).exists()
    # the same weights import fine afterwards: nothing half-written is in the way
    assert registry.import_model("interrupted", folder).version == 1


def test_prune_failed_imports_removes_killed_runs(registry: ModelRegistry) -> None:
    experiment = registry.client.get_experiment_by_name(EXPERIMENT_NAME)
    assert experiment is not None
    run = registry.client.create_run(experiment.experiment_id, tags={"twinserve.import": "pending"})
    assert registry.prune_failed_imports(older_than_s=3600) == 0  # young: maybe still importing
    assert registry.prune_failed_imports(older_than_s=0) == 1
    assert registry.client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
