"""What a GGUF import must equal: transformers' own load of the same GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch


def assert_same_tensors(written: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """`written` (what an import saved, bf16) holds every tensor of transformers' own GGUF load
    `reference` under the same name, with the reference's values rounded to bf16, bit for bit.

    A name the import left out must be a tied alias in the reference (the LM head of a tied
    model shares the embedding's storage and is saved once)."""
    missing = set(reference) - set(written)
    for name in missing:
        aliases = [n for n in written if reference[n].data_ptr() == reference[name].data_ptr()]
        assert aliases, f"{name} missing from the import and not tied to a saved tensor"
    assert set(written) <= set(reference), sorted(set(written) - set(reference))
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16, name
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def reference_state_dict(gguf_path: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF load (dequantized, fp32), as a state dict."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return dict(model.state_dict())
