"""`twinserve registry …` through typer's CliRunner: output, exit codes, readable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import tiny_llama_dir
from twinserve.cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # CliRunner is no terminal: rich would fold the tables at 80 columns
    from twinserve.cli import registry as registry_cli

    monkeypatch.setattr(registry_cli.out, "width", 220)


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('cli-registry') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("cli-models")
    return [tiny_llama_dir(root / f"m{seed}", seed=seed) for seed in range(2)]


@pytest.fixture(scope="module")
def one_version(uri: str, models: list[Path]) -> str:
    """`twin-errors` with exactly one version."""
    code, out = _run(uri, "import", "twin-errors", str(models[0]), "--quiet")
    assert code == 0, out
    return "twin-errors"


def _run(uri: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["registry", *args, "--uri", uri])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["registry", "--help"])
    assert result.exit_code == 0
    for command in ("import", "import-default", "list", "show", "history", "log-metrics", "set-alias"):
        assert command in result.output


def test_import_alias_metrics_show_history(uri: str, models: list[Path], tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_text("base_model: tiny\nprompt_template: alpaca\ngeneration_defaults:\n  temperature: 0.7\n")
    code, out = _run(uri, "import", "twin", str(models[0]), "--card", str(card), "--quiet")
    assert code == 0 and "Registered models:/twin/1" in out
    code, out = _run(uri, "import", "twin", str(models[1]), "--no-copy")
    assert code == 0 and "models:/twin/2" in out and "reference" in out
    code, out = _run(uri, "set-alias", "twin", "champion", "1", "--reason", "first")
    assert code == 0 and "twin@champion: nothing → version 1" in out
    code, out = _run(uri, "set-alias", "twin", "champion", "2")
    assert code == 0 and "version 1 → version 2" in out
    metrics_file = tmp_path / "eval.json"
    metrics_file.write_text(json.dumps({"metrics": {"toxicity": 0.02, "model": "twin"}}))
    code, out = _run(
        uri, "log-metrics", "twin", "1", "--metric", "rougeL=0.41", "--from-json", str(metrics_file)
    )
    assert code == 0 and "rougeL=0.41" in out and "toxicity=0.02" in out
    code, out = _run(uri, "list")
    assert code == 0 and "twin" in out and "champion → 2" in out
    code, out = _run(uri, "show", "twin")
    assert code == 0 and "rougeL=0.41" in out and "template=alpaca" in out and "champion" in out
    code, out = _run(uri, "show", "twin@champion")
    assert code == 0 and "models:/twin/2" in out and "reference" in out
    code, out = _run(uri, "show", "twin/1", "--json")
    shown = json.loads(out)
    assert shown["version"] == 1 and shown["card"]["generation_defaults"]["temperature"] == 0.7
    code, out = _run(uri, "history", "twin", "--json")
    moves = json.loads(out)
    assert [(m["from_version"], m["to_version"]) for m in moves] == [(None, 1), (1, 2)]
    code, out = _run(uri, "history", "twin")
    assert code == 0 and "first" in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("show", "nope"), "no registered model 'nope'"),
        (("show", "twin-errors/9"), "has no version 9"),
        (("show", "twin-errors@gold"), "has no alias 'gold'"),
        (("show", "twin-errors/abc"), "version must be a number"),
        (("set-alias", "twin-errors", "champion", "5"), "has no version 5"),
        (("set-alias", "twin-errors", "v1", "1"), "reserved"),
        (("log-metrics", "twin-errors", "1", "--metric", "rougeL"), "expected NAME=NUMBER"),
        (("log-metrics", "twin-errors", "1"), "no metrics"),
        (("history", "nope"), "no registered model 'nope'"),
        (("import", "twin-errors", "/no/such/folder"), "not a folder"),
        (("import", "twin-errors", "/no/such/model.gguf"), "GGUF file not found"),
        (("import", "twin-errors", "hf://bad"), "bad Hub reference"),
    ],
)
def test_errors_are_one_readable_line(
    uri: str, one_version: str, args: tuple[str, ...], fragment: str
) -> None:
    code, out = _run(uri, *args)
    assert code == 1, out
    assert "error:" in out and fragment in " ".join(out.split())


def test_duplicate_and_bad_card(uri: str, models: list[Path], tmp_path: Path) -> None:
    _run(uri, "import", "twin-dup", str(models[0]), "-q")
    code, out = _run(uri, "import", "twin-dup", str(models[0]), "-q")
    assert code == 1 and "already models:/twin-dup/1" in out
    bad = tmp_path / "card.yaml"
    bad.write_text("generation_defaults:\n  top_p: 2\n")
    code, out = _run(uri, "import", "twin-dup", str(models[1]), "--card", str(bad), "-q")
    assert code == 1 and "generation_defaults.top_p" in out


def test_pickle_weights_are_refused(uri: str, tmp_path: Path) -> None:
    folder = tiny_llama_dir(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    code, out = _run(uri, "import", "pickled", str(folder), "-q")
    assert code == 1 and "pickle weights" in out


def test_unreachable_store(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out = _run(f"postgresql://twin@127.0.0.1:{port}/registry", "list")
    assert code == 1 and "is unreachable" in out
