"""The compiled CPU decode kernels (`engine/fused.py`) against the PyTorch ops they replace.

The engine suite as a whole runs with them (the default) and again without them
(`make test` repeats tests/unit/engine with TWINSERVE_FUSED_KERNELS=0).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.factories import engine_config
from twinserve.config import get_settings
from twinserve.engine.factory import build_engine
from twinserve.engine.fused import FusedOps, fused_ops
from twinserve.engine.models.llama import rms_norm
from twinserve.engine.request import GenerateRequest, SamplingParams

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops() -> FusedOps:
    if not get_settings().fused_kernels:
        pytest.skip("TWINSERVE_FUSED_KERNELS=0: this run is the pure-PyTorch pass")
    found = fused_ops(torch.device("cpu"))
    if found is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the engine runs pure PyTorch here")
    assert found is not None, "a compiler is here, so the kernels must build (see the log)"
    return found


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_write_equal_the_pytorch_ops(ops: FusedOps, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    rows, n_q, n_kv, hd, capacity = 2, 6, 2, 16, 12
    qkv = torch.randn(rows, (n_q + 2 * n_kv) * hd, generator=g).to(dtype)
    cos = torch.randn(rows, 1, hd, generator=g).to(dtype)
    sin = torch.randn(rows, 1, hd, generator=g).to(dtype)
    k_cache = torch.zeros(3, n_kv, capacity, hd, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots, positions = torch.tensor([2, 0]), torch.tensor([7, 3])  # not in slot order
    q = ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, positions, n_q, n_kv, hd)
    qk = qkv[:, : (n_q + n_kv) * hd].view(rows, n_q + n_kv, hd)
    qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
    assert torch.equal(q, qk[:, :n_q])
    assert torch.equal(k_cache[slots, :, positions], qk[:, n_q:])
    assert torch.equal(v_cache[slots, :, positions], qkv[:, (n_q + n_kv) * hd :].view(rows, n_kv, hd))
    written = torch.zeros(3, capacity, dtype=torch.bool)
    written[slots, positions] = True
    assert not k_cache.transpose(1, 2)[~written].any() and not v_cache.transpose(1, 2)[~written].any()


def test_rope_refuses_a_position_outside_the_cache(ops: FusedOps) -> None:
    qkv, cos = torch.randn(1, 4 * 8), torch.randn(1, 1, 8)
    cache = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_write_kv(qkv, cos, cos, cache, cache.clone(), torch.tensor([0]), torch.tensor([4]), 2, 1, 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_silu_then_mul(ops: FusedOps, dtype: torch.dtype) -> None:
    gate_up = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(1)).to(dtype)  # a tail past 16
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_equal_the_engines_rms_norm(ops: FusedOps, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    h, delta = torch.randn(3, 72, generator=g).to(dtype), torch.randn(3, 72, generator=g).to(dtype)
    weight = (torch.rand(72, generator=g) + 0.5).to(dtype)
    assert torch.equal(ops.rms_norm(h, weight, 1e-5), rms_norm(h, weight, 1e-5))
    summed, normed = ops.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(summed, h + delta)
    # fp32 sums of squares in another order: equal up to an ulp
    torch.testing.assert_close(normed, rms_norm(h + delta, weight, 1e-5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_matches_sdpa_over_each_rows_keys(ops: FusedOps, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    rows, n_kv, group, hd, capacity = 3, 2, 3, 32, 50
    q = torch.randn(rows, n_kv * group, hd, generator=g).to(dtype)
    k_cache = torch.randn(rows + 1, n_kv, capacity, hd, generator=g).to(dtype)
    v_cache = torch.randn(rows + 1, n_kv, capacity, hd, generator=g).to(dtype)
    lengths = torch.tensor([1, 17, 50])
    got = ops.decode_attention(q, k_cache, v_cache, lengths, hd**-0.5)
    mask = (torch.arange(capacity)[None, :] < lengths[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(
        q.view(rows, n_kv, group, hd), k_cache[:rows], v_cache[:rows], attn_mask=mask
    ).reshape(rows, -1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: an ulp where roundings part
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert torch.equal(got[0].view(n_kv * group, hd), v_cache[0, :, 0].repeat_interleave(group, dim=0))


def test_the_switch_turns_them_off(ops: FusedOps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINSERVE_FUSED_KERNELS", "0")
    assert fused_ops(torch.device("cpu")) is None
    monkeypatch.setenv("TWINSERVE_FUSED_KERNELS", "1")
    assert fused_ops(torch.device("cpu")) is not None
    assert fused_ops(torch.device("meta")) is None  # CPU kernels only


PROMPTS = ["hello world", "the quick brown fox jumps over", "a"]  # rows at different positions


def _generate(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, switch: str, dtype: str, quantize: str | None
) -> list[list[tuple[int, list[tuple[int, float]]]]]:
    """Per prompt: each greedy token with the top-2 logprobs at its step."""
    monkeypatch.setenv("TWINSERVE_FUSED_KERNELS", switch)
    engine = build_engine(engine_config(model_dir, dtype=dtype, quantize=quantize))
    assert (engine.loaded.model.fused is not None) == (switch == "1")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, details=True, top_n_tokens=2)
    requests = [GenerateRequest(prompt=p, params=params) for p in PROMPTS]
    states = [engine.add_request(r) for r in requests]
    finals = {}
    while engine.has_work():
        for event in engine.step():
            if event.finished:
                finals[event.request_id] = event
    out = []
    for state in states:
        details = finals[state.request_id].details
        assert details is not None
        out.append(
            [
                (t.id, [(a.id, a.logprob) for a in top])
                for t, top in zip(details.tokens, details.top_tokens, strict=True)
            ]
        )
    return out


@pytest.mark.parametrize(("dtype", "quantize"), [("float32", None), ("auto", "int8")])
def test_greedy_output_is_the_same_with_and_without_them(
    ops: FusedOps, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, quantize: str | None
) -> None:
    fused = _generate(tiny_model_dir, monkeypatch, "1", dtype, quantize)
    plain = _generate(tiny_model_dir, monkeypatch, "0", dtype, quantize)
    assert [[t for t, _ in row] for row in fused] == [[t for t, _ in row] for row in plain]


def test_int4_greedy_output_parts_only_at_near_ties(
    ops: FusedOps, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4 computes in bf16 and its decode attention is the fused kernel's, which rounds a
    bf16 ulp apart from SDPA's: a stream may take the runner-up where the top two are a tie."""
    fused = _generate(tiny_model_dir, monkeypatch, "1", "auto", "int4")
    plain = _generate(tiny_model_dir, monkeypatch, "0", "auto", "int4")
    for got, expected in zip(fused, plain, strict=True):
        parted = next((j for j, (a, b) in enumerate(zip(got, expected, strict=True)) if a[0] != b[0]), None)
        if parted is None:
            continue
        top = expected[parted][1]
        assert got[parted][0] in [t for t, _ in top], (parted, got[parted], top)
        assert top[0][1] - top[1][1] <= 0.05, (parted, top)  # nats: a near-tie, not another answer
