"""What a checkpoint's config asks of the forward pass, and whether the engine implements it.

The engine runs one decoder (llama.py) for Llama 2/3, Mistral and Qwen2. A config that
asks for anything else (another activation, a RoPE variant whose frequencies change with
the sequence length, MLP biases, alternating attention kinds) must fail at load with a
message naming the setting: a forward pass that silently ignores it would serve wrong
tokens with no error anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twinserve.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE types whose inverse frequencies are fixed at load ("dynamic" and "longrope" recompute
# them from the running sequence length, which a precomputed table cannot follow)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-family config that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    # per layer: how many most recent positions (itself included) a token attends to; None = all
    layer_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a transformers config; ModelLoadError for anything the engine does not run."""
        check_supported(config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=getattr(config, "max_position_embeddings", 4096),
            layer_windows=layer_windows(config),
        )

    @property
    def sliding_window(self) -> int | None:
        """The one window the sliding layers share (configs of these families have one)."""
        return next((w for w in self.layer_windows if w is not None), None)

    def expected_shapes(self, layer_prefix: str) -> dict[str, tuple[int, ...]]:
        """The tensor shapes a layer under `layer_prefix` must have in the checkpoint."""
        h, q_out, kv_out = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn, mlp = layer_prefix + "self_attn.", layer_prefix + "mlp."
        return {
            layer_prefix + "input_layernorm.weight": (h,),
            layer_prefix + "post_attention_layernorm.weight": (h,),
            attn + "q_proj.weight": (q_out, h),
            attn + "k_proj.weight": (kv_out, h),
            attn + "v_proj.weight": (kv_out, h),
            attn + "o_proj.weight": (h, q_out),
            attn + "q_proj.bias": (q_out,),
            attn + "k_proj.bias": (kv_out,),
            attn + "v_proj.bias": (kv_out,),
            attn + "o_proj.bias": (h,),
            mlp + "gate_proj.weight": (self.intermediate_size, h),
            mlp + "up_proj.weight": (self.intermediate_size, h),
            mlp + "down_proj.weight": (h, self.intermediate_size),
        }


def check_supported(config: Any) -> None:
    """Refuse, naming the setting, every config feature the engine's forward pass does not implement."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported by the twinserve engine "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} is not supported (the engine's MLP is SwiGLU with silu)")
    if getattr(config, "mlp_bias", False):
        raise ModelLoadError("mlp_bias=True is not supported (the engine's MLP projections have no bias)")
    rope = rope_parameters(config)
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ModelLoadError(f"partial_rotary_factor {partial!r} is not supported (RoPE covers whole heads)")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}): "
            "its frequencies depend on the sequence length"
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings under either name transformers has used (`rope_parameters`, `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"rope parameters {params!r} are not a mapping")
    if params and not all(isinstance(v, (int, float, str, list, bool, type(None))) for v in params.values()):
        raise ModelLoadError("per-layer-type rope parameters are not supported")
    return params


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Each layer's attention window, as transformers applies it.

    Mistral: `sliding_window` on every layer (None = full attention). Qwen2: `layer_types`
    names the sliding layers (from `use_sliding_window` and `max_window_layers`).
    """
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ModelLoadError(f"sliding_window {window!r} is not a positive number of tokens")
    types = getattr(config, "layer_types", None)
    if types is None:
        return (window,) * layers
    if len(types) != layers:
        raise ModelLoadError(f"layer_types names {len(types)} layers, the model has {layers}")
    unknown = sorted(set(types) - set(_LAYER_TYPES))
    if unknown:
        raise ModelLoadError(
            f"layer type {unknown[0]!r} is not supported (supported: {', '.join(_LAYER_TYPES)})"
        )
    if "sliding_attention" in types and window is None:
        raise ModelLoadError("layer_types has sliding_attention layers but sliding_window is not set")
    return tuple(window if t == "sliding_attention" else None for t in types)
