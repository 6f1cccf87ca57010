from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same, with the LM head tied to the embeddings (like SmolLM2)."""
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama-tied"), seed=1, tie_word_embeddings=True)
