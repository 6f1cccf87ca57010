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


# rows: one stream, and a batch the kernels split over threads; head_dim: all scalar, all
# vectors, vectors and a scalar tail (80 = 2.5 vectors of 16 halves)
SHAPES = [(2, 16), (11, 64), (11, 80)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hd"), SHAPES)
def test_rope_and_cache_write_equal_the_pytorch_ops(
    ops: FusedOps, dtype: torch.dtype, rows: int, hd: int
) -> None:
    g = torch.Generator().manual_seed(0)
    n_q, n_kv, capacity = 6, 2, 12
    qkv = torch.randn(rows, (n_q + 2 * n_kv) * hd, generator=g).to(dtype)
    cos = torch.randn(rows, 1, hd, generator=g).to(dtype)
    sin = torch.randn(rows, 1, hd, generator=g).to(dtype)
    k_cache = torch.zeros(rows + 1, n_kv, capacity, hd, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(rows + 1, generator=g)[:rows]  # not in slot order
    positions = torch.randint(0, capacity, (rows,), generator=g)
    q = ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slots, positions, n_q, n_kv, hd)
    qk = qkv[:, : (n_q + n_kv) * hd].view(rows, n_q + n_kv, hd)
    qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
    assert torch.equal(q, qk[:, :n_q])
    assert torch.equal(k_cache[slots, :, positions], qk[:, n_q:])
    assert torch.equal(v_cache[slots, :, positions], qkv[:, (n_q + n_kv) * hd :].view(rows, n_kv, hd))
    written = torch.zeros(rows + 1, capacity, dtype=torch.bool)
    written[slots, positions] = True
    assert not k_cache.transpose(1, 2)[~written].any() and not v_cache.transpose(1, 2)[~written].any()


def test_rope_refuses_a_position_outside_the_cache(ops: FusedOps) -> None:
    qkv, cos = torch.randn(1, 4 * 8), torch.randn(1, 1, 8)
    cache = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_write_kv(qkv, cos, cos, cache, cache.clone(), torch.tensor([0]), torch.tensor([4]), 2, 1, 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [3, 11])
def test_silu_mul_equals_silu_then_mul(ops: FusedOps, dtype: torch.dtype, rows: int) -> None:
    # 40 columns: a tail past a vector of 32 bf16
    gate_up = torch.randn(rows, 2 * 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [3, 11])
def test_norms_equal_the_engines_rms_norm(ops: FusedOps, dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(2)
    h, delta = torch.randn(rows, 72, generator=g).to(dtype), torch.randn(rows, 72, generator=g).to(dtype)
    weight = (torch.rand(72, generator=g) + 0.5).to(dtype)
    # fp32 sums of squares in another order than PyTorch's (which depends on the batch): up to an ulp
    torch.testing.assert_close(ops.rms_norm(h, weight, 1e-5), rms_norm(h, weight, 1e-5), rtol=1e-6, atol=1e-6)
    summed, normed = ops.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(summed, h + delta)
    torch.testing.assert_close(normed, rms_norm(h + delta, weight, 1e-5), rtol=1e-6, atol=1e-6)


def _attention_case(rows: int, hd: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    n_kv, group, capacity = 2, 3, 50
    q = torch.randn(rows, n_kv * group, hd, generator=g).to(dtype)
    k_cache = torch.randn(rows + 1, n_kv, capacity, hd, generator=g).to(dtype)
    v_cache = torch.randn(rows + 1, n_kv, capacity, hd, generator=g).to(dtype)
    lengths = torch.tensor([1, 17, 50, *torch.randint(1, capacity + 1, (rows - 3,), generator=g).tolist()])
    return q, k_cache, v_cache, lengths


def _sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    rows, n_q, hd = q.shape
    n_kv = k_cache.shape[1]
    mask = (torch.arange(k_cache.shape[2])[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(
        q.view(rows, n_kv, n_q // n_kv, hd), k_cache[:rows], v_cache[:rows], attn_mask=mask
    ).reshape(rows, -1)


# head_dim: a vector and a scalar tail (24), whole vectors (32, 64); rows 11 split over threads
ATTENTION_SHAPES = [(3, 24), (3, 32), (11, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hd"), ATTENTION_SHAPES)
def test_decode_attention_matches_sdpa_over_each_rows_keys(
    ops: FusedOps, dtype: torch.dtype, rows: int, hd: int
) -> None:
    q, k_cache, v_cache, lengths = _attention_case(rows, hd, dtype)
    got = ops.decode_attention(q, k_cache, v_cache, lengths, hd**-0.5, 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: an ulp where roundings part
    torch.testing.assert_close(got, _sdpa(q, k_cache, v_cache, lengths), rtol=tol, atol=tol)
    n_kv = k_cache.shape[1]
    assert torch.equal(
        got[0].view(q.shape[1], hd), v_cache[0, :, 0].repeat_interleave(q.shape[1] // n_kv, dim=0)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_verify_shaped_attention_computes_each_query_as_a_decode_row(
    ops: FusedOps, dtype: torch.dtype
) -> None:
    """width queries per slot (a row's last token and its drafts), each with its own causal limit."""
    g = torch.Generator().manual_seed(4)
    slots, width, n_kv, group, hd, capacity = 3, 4, 2, 3, 64, 40
    q = torch.randn(slots * width, n_kv * group, hd, generator=g).to(dtype)
    k_cache = torch.randn(slots, n_kv, capacity, hd, generator=g).to(dtype)
    v_cache = torch.randn(slots, n_kv, capacity, hd, generator=g).to(dtype)
    starts = torch.tensor([0, 9, 35])
    lengths = (starts[:, None] + torch.arange(width) + 1).reshape(-1)
    got = ops.decode_attention(q, k_cache, v_cache, lengths, hd**-0.5, width)
    # the same queries as decode rows, each over its own copy of its slot
    of_slot = torch.arange(slots).repeat_interleave(width)
    alone = ops.decode_attention(q, k_cache[of_slot], v_cache[of_slot], lengths, hd**-0.5, 1)
    assert torch.equal(got, alone)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, _sdpa(q, k_cache[of_slot], v_cache[of_slot], lengths), rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="queries per slot"):
        ops.decode_attention(q[:-1], k_cache, v_cache, lengths[:-1], hd**-0.5, width)


@pytest.mark.parametrize(("rows", "hd"), ATTENTION_SHAPES)
def test_decode_attention_in_bf16_is_as_close_to_fp32_as_sdpa(ops: FusedOps, rows: int, hd: int) -> None:
    """bf16 sums in another order than SDPA's, not a less exact one: against attention computed in
    fp32 on the same bf16 inputs, the kernel's error is SDPA's, to within 10%."""
    q, k_cache, v_cache, lengths = _attention_case(rows, hd, torch.bfloat16)
    exact = _sdpa(q.float(), k_cache.float(), v_cache.float(), lengths)
    ours = (ops.decode_attention(q, k_cache, v_cache, lengths, hd**-0.5, 1).float() - exact).abs()
    theirs = (_sdpa(q, k_cache, v_cache, lengths).float() - exact).abs()
    assert ours.mean() <= 1.1 * theirs.mean(), (ours.mean(), theirs.mean())
    assert ours.max() <= theirs.max() * 1.5, (ours.max(), theirs.max())


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
