"""One tiny random Llama per test module, served for real on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("client-model") / "m")
