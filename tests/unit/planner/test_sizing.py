"""The planner's arithmetic: weights, KV cache, overhead, fit, and the roofline speed model."""

from __future__ import annotations

import pytest

from twinserve.planner.instances import CATALOG, get_instance
from twinserve.planner.model_shape import preset
from twinserve.planner.sizing import (
    GIB,
    INT4_BYTES,
    KV_ROUND_TOKENS,
    MAX_BATCH_SIZE,
    NF4_BYTES,
    Misfit,
    ReplicaMemory,
    ReplicaSpeed,
    Workload,
    compute_dtype,
    size_memory,
    size_speed,
    tensor_parallel,
    weight_bytes,
)

LLAMA_8B = preset("llama-3.1-8b")
BOOK = {"max_total_tokens": 4096, "max_batch_prefill_tokens": 4096}


def _memory(instance: str, model: str = "llama-3.1-8b", **kw: object) -> ReplicaMemory | Misfit:
    args: dict = {"dtype": "bfloat16", "quantize": None, **BOOK, **kw}
    return size_memory(preset(model), get_instance(instance), **args)


def test_weight_bytes_by_dtype_and_quantization() -> None:
    assert weight_bytes(LLAMA_8B, "bfloat16", None) == 2 * 8_030_261_248  # 16.06 GB
    assert weight_bytes(LLAMA_8B, "float32", None) == 4 * 8_030_261_248
    other = LLAMA_8B.params - LLAMA_8B.linear_params
    nf4 = weight_bytes(LLAMA_8B, "bfloat16", "bitsandbytes-nf4")
    assert nf4 == pytest.approx(LLAMA_8B.linear_params * NF4_BYTES + other * 2, abs=1)
    # int8 is CPU dynamic quantization: int8 linears and LM head, float32 everything else
    head = LLAMA_8B.vocab_size * LLAMA_8B.hidden_size  # untied: the LM head is int8 in place
    assert not LLAMA_8B.tie_word_embeddings
    assert weight_bytes(LLAMA_8B, "float32", "int8") == LLAMA_8B.linear_params + head + 4 * (other - head)
    smol = preset("smollm2-135m")  # tied: the float32 embedding stays, the head is an int8 copy
    smol_other, smol_head = smol.params - smol.linear_params, smol.vocab_size * smol.hidden_size
    assert smol.tie_word_embeddings
    assert weight_bytes(smol, "float32", "int8") == smol.linear_params + smol_head + 4 * smol_other
    # int4: 4-bit linears with a bf16 scale and minimum per 32 weights, the head an int8 copy
    int4 = weight_bytes(smol, "bfloat16", "int4")
    assert int4 == pytest.approx(smol.linear_params * INT4_BYTES + smol_head + 2 * smol_other, abs=1)


def test_compute_dtype() -> None:
    t4, a10g, cpu = (
        get_instance("ml.g4dn.xlarge"),
        get_instance("ml.g5.xlarge"),
        get_instance("ml.c7i.xlarge"),
    )
    assert compute_dtype("bfloat16", None, t4) == "float16"  # Turing has no bf16
    assert compute_dtype("bfloat16", None, a10g) == "bfloat16"
    assert compute_dtype("bfloat16", "int8", cpu) == "float32"
    assert compute_dtype("float32", "bitsandbytes", a10g) == "bfloat16"


@pytest.mark.parametrize(
    ("model", "instance", "tp"),
    [
        ("llama-3.1-70b", "ml.p4d.24xlarge", 8),
        ("llama-3.1-8b", "ml.g5.12xlarge", 4),
        ("smollm2-135m", "ml.g5.12xlarge", 1),  # 3 KV heads: no power of two > 1 divides them
        ("llama-3.1-8b", "ml.c7i.4xlarge", 1),
    ],
)
def test_tensor_parallel_is_a_power_of_two_dividing_the_heads(model: str, instance: str, tp: int) -> None:
    assert tensor_parallel(preset(model), get_instance(instance)) == tp


def test_8b_bf16_does_not_fit_a_t4() -> None:
    misfit = _memory("ml.g4dn.xlarge")
    assert isinstance(misfit, Misfit)
    assert "NVIDIA T4" in misfit.reason and "GiB" in misfit.reason


def test_8b_bf16_cannot_load_on_16_gib_hosts() -> None:
    for name in ("ml.g5.xlarge", "ml.g6.xlarge"):
        misfit = _memory(name)
        assert isinstance(misfit, Misfit) and "host RAM 16 GiB" in misfit.reason


def test_8b_on_a10g_breakdown_adds_up() -> None:
    m = _memory("ml.g5.2xlarge")
    assert isinstance(m, ReplicaMemory)
    assert m.weights_gib == pytest.approx(2 * 8_030_261_248 / GIB)  # 14.96 GiB
    assert m.kv_bytes_per_token == 131_072
    assert m.kv_one_request_gib == pytest.approx(4096 * 131_072 / GIB)  # 0.5 GiB
    assert m.overhead_gib == pytest.approx(1 + 0.1 * m.weights_gib)  # 1 GiB + 10% of weights
    assert m.need_gib == pytest.approx(m.weights_gib + m.overhead_gib + m.kv_one_request_gib)
    assert m.usable_gib == pytest.approx(22.49 * 0.95)
    assert m.need_gib < m.usable_gib and m.planned_gib <= m.usable_gib + 1e-9
    assert m.kv_budget_tokens % KV_ROUND_TOKENS == 0 and m.kv_budget_tokens >= 4096
    assert m.kv_budget_gib == pytest.approx(m.kv_budget_tokens * 131_072 / GIB)


def test_kv_budget_is_capped_at_the_engine_batch() -> None:
    m = _memory("ml.p5.48xlarge")
    assert isinstance(m, ReplicaMemory) and m.kv_budget_tokens == MAX_BATCH_SIZE * 4096


def test_70b_needs_several_gpus() -> None:
    one_gpu = [i for i in CATALOG if i.gpu_count == 1]
    assert all(isinstance(_memory(i.name, "llama-3.1-70b"), Misfit) for i in one_gpu)
    m = _memory("ml.p4d.24xlarge", "llama-3.1-70b")
    assert isinstance(m, ReplicaMemory) and m.devices == 8
    assert m.weights_gib == pytest.approx(m.weights_total_gib / 8)


def _speed(instance: str, **workload: object) -> ReplicaSpeed | Misfit:
    m = _memory(instance)
    assert isinstance(m, ReplicaMemory)
    w = {
        "prompt_tokens": 1500,
        "output_tokens": 500,
        "max_input_tokens": 2048,
        "ttft_slo_ms": None,
        "tpot_slo_ms": None,
    }
    return size_speed(LLAMA_8B, get_instance(instance), m, Workload(**{**w, **workload}), quantized=False)  # type: ignore[arg-type]


def test_speed_follows_the_documented_formulas() -> None:
    s = _speed("ml.g5.2xlarge", tpot_slo_ms=100.0, ttft_slo_ms=2000.0)
    assert isinstance(s, ReplicaSpeed)
    step, prefill = s.step_ms / 1e3, s.prefill_ms / 1e3
    assert s.requests_per_s == pytest.approx(s.concurrency / (500 * step + s.concurrency * prefill))
    assert s.tpot_ms == pytest.approx(step / (1 - s.requests_per_s * prefill) * 1e3)
    assert s.ttft_ms == pytest.approx((prefill + step) * 1e3)
    assert s.e2e_s == pytest.approx(s.ttft_ms / 1e3 + 500 * s.tpot_ms / 1e3)
    # decode reads all 16 GB of weights per step at 70% of the A10G's 600 GB/s
    assert s.step_ms > 2 * 8.03e9 / (600e9 * 0.7) * 1e3


def test_tighter_tpot_slo_means_less_concurrency() -> None:
    loose, tight = _speed("ml.g6e.xlarge", tpot_slo_ms=200.0), _speed("ml.g6e.xlarge", tpot_slo_ms=45.0)
    assert isinstance(loose, ReplicaSpeed) and isinstance(tight, ReplicaSpeed)
    assert tight.concurrency < loose.concurrency and tight.tpot_ms <= 45.0
    assert tight.limited_by == "the TPOT SLO"


def test_impossible_slo_is_a_misfit() -> None:
    misfit = _speed("ml.g5.2xlarge", tpot_slo_ms=10.0)
    assert isinstance(misfit, Misfit) and "TPOT" in misfit.reason and "even at 1 request" in misfit.reason


def test_without_slo_throughput_uses_the_whole_kv_budget() -> None:
    s = _speed("ml.g5.2xlarge")
    m = _memory("ml.g5.2xlarge")
    assert isinstance(s, ReplicaSpeed) and isinstance(m, ReplicaMemory)
    assert s.concurrency == m.kv_budget_tokens // 2000 and "KV budget" in s.limited_by
