"""The CLI parses and shows help without loading any model."""

from __future__ import annotations

from typer.testing import CliRunner

from twinserve import __version__
from twinserve.cli.main import app

runner = CliRunner()


def test_root_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("model", "generate", "bench"):
        assert command in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_model_help_lists_default() -> None:
    result = runner.invoke(app, ["model", "--help"])
    assert result.exit_code == 0, result.output
    assert "default" in result.output


def test_model_default_failure_is_readable(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("TWINSERVE_DEFAULT_MODEL_WHEEL", str(tmp_path / "missing.whl"))
    result = runner.invoke(app, ["model", "default", "--quiet"])
    assert result.exit_code == 1
    assert "TWINSERVE_DEFAULT_MODEL_WHEEL" in result.output
    assert "Traceback" not in result.output
