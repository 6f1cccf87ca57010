"""`batch create --platform ray` refusals that need no cluster: an unreachable address, no Ray
installed, flags that do not go together; and how an actor's fatal error crosses back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twinserve.cli.main import app
from twinserve.errors import EngineDeadError, ServerError, UnreachableError
from twinserve.jobs.checkpoints import JobDir
from twinserve.platforms.ray.batch import error_named

runner = CliRunner()


@pytest.fixture
def args(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home"))
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"inputs": "hello"}) + "\n")
    return ["batch", "create", "rj", "--model", str(tiny_model_dir), "--input", str(source)] + [
        "--output",
        str(tmp_path / "out"),
        "--foreground",
    ]


def test_an_unreachable_address_fails_with_the_address_and_creates_nothing(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--platform", "ray", "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 1, result.output
    assert "no Ray cluster answers at 127.0.0.1:1" in result.output
    assert "ray start --head" in result.output
    assert not JobDir("rj").exists()


def test_without_ray_installed_the_message_names_the_extra(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when absent
    result = runner.invoke(app, [*args, "--platform", "ray"])
    assert result.exit_code == 2, result.output
    assert "pip install 'twinserve[ray]'" in result.output
    assert not JobDir("rj").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--platform", "ray", "--endpoint", "somewhere"], "needs no Ray"),
        (["--actors", "3"], "need --platform ray"),
        (["--ray-address", "127.0.0.1:6379"], "need --platform ray"),
        (["--platform", "ray", "--actors", "0"], "ray.actors"),
        (["--platform", "spark"], "platform"),
    ],
)
def test_flags_that_do_not_go_together_are_refused(args: list[str], flags: list[str], message: str) -> None:
    if "--endpoint" in flags:  # instead of --model
        i = args.index("--model")
        args = args[:i] + args[i + 2 :]
    result = runner.invoke(app, [*args, *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not JobDir("rj").exists()


def test_an_actors_fatal_error_comes_back_as_its_own_class() -> None:
    dead = error_named("EngineDeadError", "the engine stopped")
    assert type(dead) is EngineDeadError and dead.message == "the engine stopped"
    assert type(error_named("UnreachableError", "gone")) is UnreachableError
    unknown = error_named("SafetensorError", "header too large")  # not ours: a ServerError, same words
    assert type(unknown) is ServerError and unknown.message == "header too large"
