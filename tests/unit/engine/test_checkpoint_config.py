"""The engine reads config.json as transformers' AutoConfig does (checkpoint_config.py).

Each case is a config.json as checkpoints on the Hub write it (new and legacy RoPE fields,
fields left to their defaults, each family's sliding-window fields): what the forward pass is
built from (its shape, RoPE frequencies and scaling, EOS ids) must be the same from both
readings, and a config one refuses the other refuses too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.engine_driver import built_from
from tests.factories import engine_config
from twinserve.engine.loader import load_model
from twinserve.engine.models.checkpoint_config import CheckpointConfig, read_checkpoint_config
from twinserve.errors import ModelLoadError

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES: dict[str, dict[str, Any]] = {
    "llama-defaults": {"model_type": "llama"},
    "llama-small": {"model_type": "llama", **SMALL, "vocab_size": 300},
    "llama-gqa-head-dim": {
        "model_type": "llama",
        **SMALL,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "eos_token_id": [5, 7],
    },
    "llama-rope-theta": {"model_type": "llama", **SMALL, "rope_theta": 500000.0},
    "llama3-legacy-rope-scaling": {
        "model_type": "llama",
        **SMALL,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
    },
    "llama3-rope-parameters": {
        "model_type": "llama",
        **SMALL,
        "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0},
    },
    "linear-legacy-type-key": {
        "model_type": "llama",
        **SMALL,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    },
    "yarn-length-from-max-positions": {
        "model_type": "llama",
        **SMALL,
        "max_position_embeddings": 256,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    },
    "yarn-given-length": {
        "model_type": "llama",
        **SMALL,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    },
    "yarn-length-outside-rope-fields": {  # as Phi-3-style checkpoints save it: it wins
        "model_type": "llama",
        **SMALL,
        "original_max_position_embeddings": 128,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    },
    "mistral-defaults": {"model_type": "mistral", **SMALL},
    "mistral-window": {"model_type": "mistral", **SMALL, "sliding_window": 16},
    "mistral-no-window": {"model_type": "mistral", **SMALL, "sliding_window": None},
    "qwen2-defaults": {"model_type": "qwen2", **SMALL},
    "qwen2-window-unused": {"model_type": "qwen2", **SMALL, "sliding_window": 16},
    "qwen2-sliding": {
        "model_type": "qwen2",
        **SMALL,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 1,
    },
    "qwen2-layer-types": {
        "model_type": "qwen2",
        **SMALL,
        "use_sliding_window": True,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "qwen2-tied-theta": {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True, "rope_theta": 1e6},
}
REFUSED: dict[str, dict[str, Any]] = {
    "another-model-type": {"model_type": "gpt2", "n_embd": 64},
    "gelu": {"model_type": "llama", **SMALL, "hidden_act": "gelu"},
    "mlp-bias": {"model_type": "llama", **SMALL, "mlp_bias": True},
    "partial-rotary": {"model_type": "llama", **SMALL, "partial_rotary_factor": 0.5},
    "dynamic-rope": {"model_type": "llama", **SMALL, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    "unknown-layer-type": {
        "model_type": "qwen2",
        **SMALL,
        "layer_types": ["full_attention", "chunked_attention", "full_attention"],
    },
}


def write_config(folder: Path, values: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_the_forward_pass_is_built_from_the_same_numbers(case: str, tmp_path: Path) -> None:
    folder = write_config(tmp_path, CASES[case])
    ours = read_checkpoint_config(folder)
    assert isinstance(ours, CheckpointConfig)
    assert built_from(ours) == built_from(AutoConfig.from_pretrained(folder))


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_the_engine_refuses_it_refuses_from_both_readings(case: str, tmp_path: Path) -> None:
    folder = write_config(tmp_path, REFUSED[case])
    errors = []
    for config in (read_checkpoint_config(folder), AutoConfig.from_pretrained(folder)):
        with pytest.raises(ModelLoadError) as info:
            built_from(config)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{not json", "cannot read config"),
        ("[1, 2]", "is not a JSON object"),
        ('{"model_type": "llama", "hidden_size": 0}', "hidden_size 0 is not a positive whole number"),
        ('{"model_type": "llama", "num_attention_heads": "32"}', "num_attention_heads '32'"),
        ('{"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}', "not a multiple"),
    ],
)
def test_a_broken_config_is_a_load_error_naming_it(text: str, named: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=named):
        read_checkpoint_config(tmp_path)


def test_a_missing_config_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read config"):
        read_checkpoint_config(tmp_path)


def test_the_tokenizer_is_the_one_autotokenizer_picks(tiny_model_dir: Path) -> None:
    ours = load_model(engine_config(tiny_model_dir)).tokenizer
    theirs = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(ours) is type(theirs)
    text = "héllo wörld <|im_start|>user\nhi<|im_end|>"
    assert ours(text).input_ids == theirs(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
