"""GGUF → Hugging Face layout (safetensors), so the engine only ever loads one format.

transformers reads a GGUF checkpoint (asked to dequantize it) and we save the result as a
plain checkpoint. When transformers 5.x keeps its GGUF quantizer attached to the model,
`save_pretrained` fails (or writes a `quantization_config` that sends the loader looking
for a GGUF file), so the quantizer is detached before saving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twinserve.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("bfloat16", "float16", "float32")


def load_gguf(gguf_path: Path, dtype: str = "bfloat16") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from one GGUF file, dequantized to `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=getattr(torch, dtype), **_dequantize_kwargs()
        )
    except Exception as exc:  # transformers raises many types; callers need one
        raise ModelLoadError(f"cannot load GGUF {gguf_path}: {exc}") from exc
    return model, tokenizer


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Save as safetensors + tokenizer files; the folder loads with no GGUF involved."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _drop_quantization_config(out_dir / "config.json")
    return out_dir


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Convert one GGUF file into a Hugging Face layout folder at `out_dir`; returns `out_dir`."""
    model, tokenizer = load_gguf(gguf_path, dtype)
    return save_hf(model, tokenizer, out_dir)


def _dequantize_kwargs() -> dict[str, Any]:
    # Ask for dense weights outright (we are about to save them) rather than rely on
    # transformers' fallback when it has no kernel for the file's block types.
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers without a GGUF quantizer dequantizes anyway
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantization_config(config_path: Path) -> None:
    # Belt and braces: the weights are dequantized now, and a leftover GGUF
    # quantization_config would make from_pretrained look for a GGUF file again.
    config: dict[str, Any] = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
