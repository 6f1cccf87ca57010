"""RMSNorm rounds exactly like transformers' LlamaRMSNorm in 16-bit dtypes (greedy parity)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from twinserve.engine.models.llama import rms_norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_is_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(257, 96, generator=g) * 4).to(dtype)
    reference = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(96, generator=g).to(dtype))
        want = reference(x)
    got = rms_norm(x, reference.weight.detach(), 1e-5)
    assert got.dtype == dtype
    if dtype == torch.float32:  # one fused kernel vs three ops: last-bit differences allowed
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)
