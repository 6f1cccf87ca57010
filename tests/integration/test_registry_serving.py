"""Serving by registry reference, end to end: `twinserve serve --model models:/llm-twin@champion`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.servers import process_server
from twinserve.registry.store import ModelRegistry

pytestmark = pytest.mark.integration


def test_serve_the_champion_by_alias(default_model_path: Path, tmp_path: Path) -> None:
    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    champion = ModelRegistry(uri, artifacts).import_default()
    assert champion.version == 1 and "champion" in champion.aliases
    env = {"TWINSERVE_REGISTRY_URI": uri, "TWINSERVE_REGISTRY_ARTIFACTS": artifacts}
    with process_server(["--model", "models:/llm-twin@champion"], tmp_path / "serve.log", env=env) as server:
        info = httpx.get(f"{server.url}/info").json()
        assert (info["model_id"], info["registry_name"], info["registry_version"]) == (
            "llm-twin",
            "llm-twin",
            1,
        )
        assert info["weights_sha256"] == champion.content_sha256
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 20,
            },
            timeout=60,
        )
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
        log = server.log_path.read_text()
        assert '"registry_version": 1' in log  # the exact version is in the logs too


def test_an_unknown_alias_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"TWINSERVE_REGISTRY_URI": uri, "TWINSERVE_REGISTRY_ARTIFACTS": str(tmp_path / "artifacts")}
    with process_server(
        ["--model", "models:/llm-twin@nope"], tmp_path / "serve.log", env=env, wait=False
    ) as server:
        assert server.proc.wait(120) == 1
        assert "llm-twin" in server.log_path.read_text()
