"""A checkpoint's config.json read as transformers reads it, without transformers' config classes.

`AutoConfig.from_pretrained` imports transformers' config validators and, through them,
`torch.distributed.tensor`, sympy and accelerate: ~1.8 s of every replica's start on a 2-core
machine, to read one small JSON file. The engine runs three model types and needs a dozen of
their numbers, so this module applies the defaults and derivations of their config classes
(LlamaConfig, MistralConfig, Qwen2Config and the RoPE standardization of transformers 5) to
the JSON itself; tests/unit/engine/test_checkpoint_config.py holds both readings equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twinserve.errors import ModelLoadError

DEFAULT_ROPE_THETA = 10_000.0
# RoPE types whose pretraining length transformers records in the RoPE parameters
_ROPE_TYPES_WITH_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")
# each class's defaults for the fields the engine reads (the dataclass fields of transformers 5)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "head_dim": None,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": None,
        "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "sliding_window": 4096,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "bos_token_id": None,
        "eos_token_id": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "layer_types": None,
    },
}


class CheckpointConfig(SimpleNamespace):
    """The config's fields as attributes (like a transformers config), defaults applied."""

    def __init__(self, source: Path, values: dict[str, Any]) -> None:
        super().__init__(**values)
        self._source = source

    def transformers_config(self) -> Any:
        """transformers' own config object, for the RoPE types whose frequencies its functions compute."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self._source)


def read_checkpoint_config(folder: Path) -> CheckpointConfig:
    """`folder/config.json` with the defaults and derivations of its model type's config class.

    A model type the engine does not run keeps its raw fields: the engine's architecture check
    then refuses it by name.
    """
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read config in {folder}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    model_type = raw.get("model_type")
    defaults = _DEFAULTS.get(model_type) if isinstance(model_type, str) else None
    if defaults is None:
        return CheckpointConfig(folder, raw)
    values = {**defaults, **raw}
    _check_numbers(values, path)
    if values.get("head_dim") is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if model_type == "qwen2":
        _derive_qwen2_layers(values)
    values["rope_parameters"] = _standard_rope_parameters(values)
    values.pop("rope_scaling", None)
    return CheckpointConfig(folder, values)


def _check_numbers(values: dict[str, Any], path: Path) -> None:
    """The sizes the shapes are computed from must be positive whole numbers (as transformers checks)."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelLoadError(f"{path}: {key} {value!r} is not a positive whole number")
    if values["hidden_size"] % values["num_attention_heads"] and values.get("head_dim") is None:
        raise ModelLoadError(
            f"{path}: hidden_size {values['hidden_size']} is not a multiple of "
            f"num_attention_heads {values['num_attention_heads']}"
        )


def _derive_qwen2_layers(values: dict[str, Any]) -> None:
    """Qwen2Config: the window applies only with use_sliding_window, from max_window_layers on."""
    if not values["use_sliding_window"]:
        values["sliding_window"] = None
    if values.get("layer_types") is None:
        window, first = values["sliding_window"], values["max_window_layers"]
        values["layer_types"] = [
            "sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(values["num_hidden_layers"])
        ]


def _standard_rope_parameters(values: dict[str, Any]) -> Any:
    """transformers 5's one RoPE dict: legacy `rope_scaling` first, then `rope_parameters`, with
    `rope_theta` (default 10000), `partial_rotary_factor` and the pretraining length folded in."""
    params = values.get("rope_scaling") or values.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        return params  # not one global dict: the architecture check names it
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", values.get("rope_theta", DEFAULT_ROPE_THETA))
    if values.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", values["partial_rotary_factor"])
    if params["rope_type"] in _ROPE_TYPES_WITH_ORIGINAL_LENGTH:
        if "original_max_position_embeddings" in values:
            params["original_max_position_embeddings"] = values["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", values["max_position_embeddings"])
    return params
