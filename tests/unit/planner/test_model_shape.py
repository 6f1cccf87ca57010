"""Model shapes: presets match the published checkpoints; configs, folders and refs are read without weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from twinserve.errors import NotFoundError, ValidationError
from twinserve.planner.model_shape import (
    PRESETS,
    from_config,
    from_folder,
    from_params,
    preset,
    resolve_source,
)

SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.1-70b", 70_553_706_496),
        ("mistral-7b", 7_248_023_552),
        ("smollm2-135m", 134_515_008),
    ],
)
def test_presets_match_published_parameter_counts(name: str, params: int) -> None:
    assert PRESETS[name].params == params


def test_kv_bytes_per_token() -> None:
    # 2 (K and V) × 32 layers × 8 KV heads × 128 dims × 2 bytes = 128 KiB per token
    assert preset("llama-3.1-8b").kv_bytes_per_token(2) == 131_072
    assert preset("llama-3.1-70b").kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2
    assert preset("smollm2-135m").kv_bytes_per_token(2) == 2 * 30 * 3 * 64 * 2


def test_linear_params_exclude_embeddings_and_norms() -> None:
    llama = preset("llama-3.1-8b")
    embeddings = 2 * 128_256 * 4096  # untied: embedding + lm_head
    assert llama.linear_params == llama.params - embeddings - (2 * 32 + 1) * 4096


def test_aliases_and_unknown_preset() -> None:
    twin = preset("TwinLlama-3.1-8B")
    assert twin.name == "twinllama-3.1-8b" and twin.params == PRESETS["llama-3.1-8b"].params
    with pytest.raises(ValidationError, match="known presets: .*llama-3.1-8b"):
        preset("gpt-5")


def test_params_alone_borrow_the_nearest_architecture() -> None:
    shape, note = from_params(8e9)
    assert shape.params == 8_000_000_000 and shape.num_layers == 32 and shape.num_kv_heads == 8
    assert note is not None and "llama-3.1-8b" in note
    big, _ = from_params(65e9)
    assert big.num_layers == 80
    exact, no_note = from_params(7.2e9, like="mistral-7b")
    assert exact.vocab_size == 32768 and no_note is None


@pytest.mark.parametrize("bad", [0, -8e9, math.nan, math.inf])
def test_params_must_be_a_positive_count(bad: float) -> None:
    with pytest.raises(ValidationError, match="--params"):
        from_params(bad)


def test_config_formula_matches_the_preset() -> None:
    shape = from_config(SMOLLM2_CONFIG, name="smol", source="test")
    assert shape.params == PRESETS["smollm2-135m"].params
    assert shape.head_dim == 64 and shape.tie_word_embeddings


def test_config_without_decoder_fields_is_refused() -> None:
    with pytest.raises(ValidationError, match="give --preset or --params"):
        from_config({"model_type": "bert"}, name="x", source="x/config.json")


def test_folder_params_come_from_safetensors_headers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    save_file(
        {"a": np.zeros((3, 5), dtype=np.float16), "b": np.zeros((7,), dtype=np.float16)},
        tmp_path / "x.safetensors",
    )
    shape = from_folder(tmp_path)
    assert shape.params == 22  # the headers win over the config formula
    assert "safetensors headers" in shape.source


def test_folder_without_config_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no config.json"):
        from_folder(tmp_path)


def test_resolve_default_and_folder(tmp_path: Path) -> None:
    default = resolve_source("default")
    assert default.shape.params == 134_515_008 and default.reference == "default"
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    folder = resolve_source(str(tmp_path))
    assert folder.reference == str(tmp_path) and folder.shape.num_kv_heads == 3
    with pytest.raises(NotFoundError):
        resolve_source(str(tmp_path / "missing"))


def test_registry_reference_reads_config_and_card_without_hashing_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.factories import tiny_llama_dir
    from twinserve.registry import content
    from twinserve.registry.card import ModelCard
    from twinserve.registry.store import ModelRegistry

    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"))
    card = ModelCard(max_input_tokens=128, max_total_tokens=256, quantization="bitsandbytes")
    info = registry.import_model("tiny", tiny_llama_dir(tmp_path / "tiny"), card)
    registry.set_alias("tiny", "champion", info.version)
    monkeypatch.setenv("TWINSERVE_REGISTRY_URI", registry.location.uri)
    monkeypatch.setenv("TWINSERVE_REGISTRY_ARTIFACTS", registry.location.artifact_location or "")

    def no_hashing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the planner must not read the weights")

    monkeypatch.setattr(content, "verify_folder", no_hashing)
    source = resolve_source("models:/tiny@champion")
    assert source.reference == "models:/tiny@champion"
    assert (source.shape.hidden_size, source.shape.num_kv_heads, source.shape.head_dim) == (64, 2, 16)
    assert "safetensors headers" in source.shape.source and source.shape.name == "tiny v1"
    assert (source.card_max_input_tokens, source.card_max_total_tokens) == (128, 256)
    assert source.card_quantize == "bitsandbytes"
