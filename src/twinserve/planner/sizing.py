"""The planner's arithmetic: how much memory one replica needs, and how fast it serves.

Memory, per GPU (tensor parallelism splits weights and KV heads over `tp` GPUs; on a CPU
instance, the host):

    weights    = linear params × bytes(quantization) + other params × bytes(dtype)   ÷ tp
    KV / token = 2 × layers × kv_heads × head_dim × bytes(dtype)                     ÷ tp
    overhead   = 1 GiB (CUDA context, cuBLAS/NCCL workspaces; Python + torch on CPU)
                 + max(10% of weights, activations of one MAX_BATCH_PREFILL_TOKENS pass)
    usable     = 95% of GPU memory (5% for allocator fragmentation); 80% of host RAM on CPU
    fits       ⇔ weights + overhead + KV(MAX_TOTAL_TOKENS) ≤ usable   (one full-length request)
    MAX_BATCH_TOTAL_TOKENS = (usable − weights − overhead) ÷ KV per token, rounded down to 256,
                 at most 64 × MAX_TOTAL_TOKENS (the engine decodes ≤ 64 requests per step)

A GPU instance must also hold the weights in host RAM while they load (+4 GiB for the
container): ml.g5.xlarge's 16 GiB cannot load 15 GiB of 8B bf16 weights safely, which is
why the LLM Engineer's Handbook deploys 8B models on ml.g5.2xlarge (32 GiB).

Speed, a roofline estimate per replica. Decode is memory-bandwidth bound: each step reads
every weight once, plus the KV cache of every running request; prefill is compute bound:

    step(B)    = max(bytes read ÷ (bandwidth × 0.7), 2 × params × B ÷ (FLOPS × 0.5)) + overhead
                 bytes read = params × 2 (16-bit) + B × context × KV/token
    prefill(p) = (2 × params × p + 2 × layers × p² × heads × head_dim) ÷ (FLOPS × 0.5)
    λ(B)       = B ÷ (output × step(B) + B × prefill(prompt))        requests/s per replica
    TPOT(B)    = step(B) ÷ (1 − λ(B) × prefill(prompt))             decode pauses for prefills
    TTFT(B)    = prefill(prompt) + step(B)

`B` (requests decoded together) is the largest that keeps TPOT and TTFT within the SLOs and
whose requests (prompt + output tokens each) fit MAX_BATCH_TOTAL_TOKENS. λ follows from
Little's law applied to the decoding requests (B = λ × output × TPOT). A quantized model is
assumed to decode at its 16-bit speed: bitsandbytes and dynamic-int8 kernels dequantize on
the fly, so quantization buys memory, not time. Tensor parallelism keeps 90% of its linear
speed-up over NVLink and 70% over PCIe (all-reduce after every layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from twinserve.config import Quantize
from twinserve.planner.instances import InstanceType
from twinserve.planner.model_shape import ModelShape

PlanDtype = Literal["bfloat16", "float16", "float32"]

GIB = 1024**3
GPU_MEMORY_FRACTION = 0.95
CPU_MEMORY_FRACTION = 0.80
RUNTIME_OVERHEAD_GIB = 1.0
ACTIVATION_FRACTION = 0.10
HOST_LOAD_MARGIN_GIB = 4.0
KV_ROUND_TOKENS = 256
MAX_BATCH_SIZE = 64  # EngineConfig.max_batch_size: the engine decodes at most this many per step
BANDWIDTH_UTILIZATION = 0.7  # decode kernels reach 60-80% of peak memory bandwidth
FLOPS_UTILIZATION = 0.5  # prefill GEMMs reach 40-60% of peak tensor FLOPS
TP_EFFICIENCY_NVLINK = 0.9
TP_EFFICIENCY_PCIE = 0.7
STEP_OVERHEAD_S = {"cuda": 0.003, "cpu": 0.010}  # scheduler, sampling, Python per decode step
NF4_BYTES = 0.5625  # 4 bits + one fp32 absmax per 64-weight block (no double quantization)
INT4_BYTES = 0.625  # 4 bits + a bf16 scale and minimum per 32-weight group

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


def compute_dtype(dtype: PlanDtype, quantize: Quantize | None, instance: InstanceType) -> PlanDtype:
    """The dtype activations, KV cache and unquantized weights actually run in on `instance`.

    int8 (CPU dynamic quantization) keeps float32 activations, int4 (CPU) bfloat16 ones;
    bitsandbytes needs a 16-bit compute dtype; a T4 has no bfloat16, so float16 (same size)
    stands in.
    """
    if quantize == "int8":
        return "float32"
    if quantize == "int4":
        return "bfloat16"
    if quantize is not None and dtype == "float32":
        dtype = "bfloat16"
    if dtype == "bfloat16" and instance.gpu is not None and not instance.gpu.bf16:
        return "float16"
    return dtype


def linear_bytes(dtype: PlanDtype, quantize: Quantize | None) -> float:
    """Bytes per weight of an attention/MLP projection (the layers quantization applies to)."""
    if quantize == "bitsandbytes-nf4":
        return NF4_BYTES
    if quantize == "int4":
        return INT4_BYTES
    if quantize is not None:  # int8 and bitsandbytes (LLM.int8): one byte, per-row scales are noise
        return 1.0
    return DTYPE_BYTES[dtype]


def weight_bytes(shape: ModelShape, dtype: PlanDtype, quantize: Quantize | None) -> int:
    """Bytes of the weights in memory: quantization shrinks the linear layers.

    int8 and int4 also quantize the LM head (to int8 both), into a copy of its own when the
    embedding is tied (the embedding lookup stays in the activation dtype).
    """
    other = shape.params - shape.linear_params
    linear = shape.linear_params * linear_bytes(dtype, quantize)
    if quantize in ("int8", "int4"):
        head = shape.vocab_size * shape.hidden_size
        other -= 0 if shape.tie_word_embeddings else head
        return math.ceil(linear + head + other * DTYPE_BYTES[dtype])
    return math.ceil(linear + other * DTYPE_BYTES[dtype])


def tensor_parallel(shape: ModelShape, instance: InstanceType) -> int:
    """GPUs one replica shards over: the largest power of two on the instance that divides the heads."""
    if not instance.is_gpu:
        return 1
    tp = 1
    while (
        tp * 2 <= instance.gpu_count
        and shape.num_kv_heads % (tp * 2) == 0
        and shape.num_attention_heads % (tp * 2) == 0
    ):
        tp *= 2
    return tp


class ReplicaMemory(BaseModel):
    """Memory of one replica, per GPU (or for the host on CPU), in GiB unless named otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["cuda", "cpu"] = Field(description="Where the model runs.")
    devices: int = Field(ge=1, description="GPUs one replica shards over (SM_NUM_GPUS); 1 on CPU.")
    dtype: PlanDtype = Field(description="Compute dtype (activations, KV cache, unquantized weights).")
    weights_total_gib: float = Field(description="All weights of the model.")
    weights_gib: float = Field(description="Weights on one device (÷ devices).")
    kv_bytes_per_token: int = Field(description="K+V of one token, whole model, bytes.")
    kv_bytes_per_token_per_device: int = Field(description="K+V of one token on one device, bytes.")
    kv_one_request_gib: float = Field(description="KV cache of one MAX_TOTAL_TOKENS request on one device.")
    kv_budget_tokens: int = Field(description="MAX_BATCH_TOTAL_TOKENS: KV tokens the memory left holds.")
    kv_budget_gib: float = Field(description="KV cache of MAX_BATCH_TOTAL_TOKENS tokens on one device.")
    overhead_gib: float = Field(description="Runtime overhead on one device (context + activations).")
    need_gib: float = Field(
        description="weights + overhead + one full request's KV: the least that must fit."
    )
    planned_gib: float = Field(description="weights + overhead + the whole KV budget.")
    device_memory_gib: float = Field(description="Memory of one GPU (nvidia-smi total), or host RAM on CPU.")
    usable_gib: float = Field(description="The share of it the plan may fill (95% GPU, 80% host).")
    host_memory_gib: float = Field(description="Host RAM of the instance.")
    host_need_gib: float = Field(description="Host RAM needed while loading (GPU: weights + 4 GiB).")


@dataclass(frozen=True)
class Misfit:
    """Why a model does not fit an instance, in words."""

    reason: str


def size_memory(
    shape: ModelShape,
    instance: InstanceType,
    *,
    dtype: PlanDtype,
    quantize: Quantize | None,
    max_total_tokens: int,
    max_batch_prefill_tokens: int,
) -> ReplicaMemory | Misfit:
    """The memory plan of one replica on `instance`, or why it does not fit."""
    tp = tensor_parallel(shape, instance)
    act = compute_dtype(dtype, quantize, instance)
    act_bytes = DTYPE_BYTES[act]
    weights_total = weight_bytes(shape, act, quantize)
    weights = weights_total / tp
    kv_token = shape.kv_bytes_per_token(act_bytes)
    kv_token_dev = kv_token / tp
    activations = (
        max_batch_prefill_tokens * (4 * shape.hidden_size + 2 * shape.intermediate_size / tp) * act_bytes
    )
    overhead = RUNTIME_OVERHEAD_GIB * GIB + max(ACTIVATION_FRACTION * weights, activations)
    if instance.gpu is not None:
        device_mem, fraction = instance.gpu.memory_gib, GPU_MEMORY_FRACTION
        host_need = weights_total / GIB + HOST_LOAD_MARGIN_GIB
    else:
        device_mem, fraction = instance.host_memory_gib, CPU_MEMORY_FRACTION
        host_need = (weights_total + overhead) / GIB
    usable = device_mem * fraction * GIB
    need = weights + overhead + kv_token_dev * max_total_tokens
    if need > usable:
        where = "host RAM" if instance.gpu is None else f"each {instance.gpu.name} (tp={tp})"
        return Misfit(
            f"needs {need / GIB:.1f} GiB (weights "
            f"{weights / GIB:.1f} + overhead {overhead / GIB:.1f} + KV of one {max_total_tokens}-token "
            f"request {kv_token_dev * max_total_tokens / GIB:.2f}) > {usable / GIB:.1f} GiB usable on {where}"
        )
    if instance.gpu is not None and host_need > instance.host_memory_gib:
        return Misfit(
            f"host RAM {instance.host_memory_gib:g} GiB < {host_need:.1f} GiB needed to load "
            f"{weights_total / GIB:.1f} GiB of weights (+{HOST_LOAD_MARGIN_GIB:g} GiB for the container)"
        )
    fit_tokens = int((usable - weights - overhead) // kv_token_dev)
    budget = min(fit_tokens - fit_tokens % KV_ROUND_TOKENS, MAX_BATCH_SIZE * max_total_tokens)
    budget = max(budget, max_total_tokens)
    return ReplicaMemory(
        device="cuda" if instance.gpu is not None else "cpu",
        devices=tp,
        dtype=act,
        weights_total_gib=weights_total / GIB,
        weights_gib=weights / GIB,
        kv_bytes_per_token=kv_token,
        kv_bytes_per_token_per_device=math.ceil(kv_token_dev),
        kv_one_request_gib=kv_token_dev * max_total_tokens / GIB,
        kv_budget_tokens=budget,
        kv_budget_gib=kv_token_dev * budget / GIB,
        overhead_gib=overhead / GIB,
        need_gib=need / GIB,
        planned_gib=(weights + overhead + kv_token_dev * budget) / GIB,
        device_memory_gib=device_mem,
        usable_gib=usable / GIB,
        host_memory_gib=instance.host_memory_gib,
        host_need_gib=host_need,
    )


class ReplicaSpeed(BaseModel):
    """Roofline estimate of one replica at its planned concurrency."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: int = Field(ge=1, description="Requests decoded together (B) at the plan's operating point.")
    limited_by: str = Field(description="What stops B from growing: an SLO, the KV budget, the batch cap.")
    prefill_ms: float = Field(description="Prefill of one expected prompt.")
    step_ms: float = Field(description="One decode step at B requests.")
    ttft_ms: float = Field(description="Time to first token of an expected prompt at B.")
    ttft_max_input_ms: float = Field(description="Time to first token of a MAX_INPUT_TOKENS prompt at B.")
    tpot_ms: float = Field(
        description="Time per output token seen by a client at B (prefill pauses included)."
    )
    e2e_s: float = Field(description="Whole request: TTFT + output tokens × TPOT.")
    requests_per_s: float = Field(description="Requests one replica completes per second at B (λ).")
    output_tokens_per_s: float = Field(description="Generated tokens per second of one replica at B.")


@dataclass(frozen=True)
class _Rates:
    bandwidth: float  # bytes/s, effective
    flops: float  # FLOP/s, effective
    step_overhead_s: float


def _rates(instance: InstanceType, tp: int, dtype: PlanDtype) -> _Rates:
    if instance.gpu is None:
        return _Rates(instance.cpu_bandwidth_gbs * 1e9, instance.cpu_tflops * 1e12, STEP_OVERHEAD_S["cpu"])
    scale = tp * (1.0 if tp == 1 else TP_EFFICIENCY_NVLINK if instance.nvlink else TP_EFFICIENCY_PCIE)
    tflops = instance.gpu.dense_tflops * (0.5 if dtype == "float32" else 1.0)  # TF32 runs at half rate
    return _Rates(
        bandwidth=instance.gpu.bandwidth_gbs * 1e9 * BANDWIDTH_UTILIZATION * scale,
        flops=tflops * 1e12 * FLOPS_UTILIZATION * scale,
        step_overhead_s=STEP_OVERHEAD_S["cuda"],
    )


@dataclass(frozen=True)
class Workload:
    """What one request asks for, and the latency it must meet (None: nobody waits)."""

    prompt_tokens: int
    output_tokens: int
    max_input_tokens: int
    ttft_slo_ms: float | None
    tpot_slo_ms: float | None


def size_speed(
    shape: ModelShape,
    instance: InstanceType,
    memory: ReplicaMemory,
    workload: Workload,
    *,
    quantized: bool,
) -> ReplicaSpeed | Misfit:
    """The best operating point of one replica: the most throughput within the SLOs."""
    rates = _rates(instance, memory.devices, memory.dtype)
    read_bytes = shape.params * (2 if quantized else DTYPE_BYTES[memory.dtype])
    w = workload
    context = w.prompt_tokens + w.output_tokens / 2  # average over a request's decode

    def step(b: int) -> float:
        memory_s = (read_bytes + b * context * memory.kv_bytes_per_token) / rates.bandwidth
        compute_s = 2 * shape.params * b / rates.flops
        return max(memory_s, compute_s) + rates.step_overhead_s

    def prefill(p: int) -> float:
        attention = 2 * shape.num_layers * p * p * shape.num_attention_heads * shape.head_dim
        return (2 * shape.params * p + attention) / rates.flops

    t_p = prefill(w.prompt_tokens)

    def at(b: int) -> tuple[float, float, float, float]:  # step, λ, TPOT, TTFT at b requests
        t_s = step(b)
        lam = b / (w.output_tokens * t_s + b * t_p)
        return t_s, lam, t_s / (1 - lam * t_p), t_p + t_s

    b_max = min(MAX_BATCH_SIZE, memory.kv_budget_tokens // (w.prompt_tokens + w.output_tokens))
    if b_max == MAX_BATCH_SIZE:
        limit = f"the engine's batch cap of {MAX_BATCH_SIZE} requests per step"
    else:
        limit = "the KV budget, MAX_BATCH_TOTAL_TOKENS"
    best = 0
    for b in range(1, b_max + 1):
        _, _, tpot, ttft = at(b)
        if broken := _slo_broken(ttft, tpot, w):
            if b == 1:
                return Misfit(f"{broken} even at 1 request")
            limit = f"the {broken.split(' ', 1)[0]} SLO"
            break
        best = b
    if best == 0:  # cannot happen: the KV budget always holds one MAX_TOTAL_TOKENS request
        return Misfit("the KV budget holds no request")
    t_s, lam, tpot, ttft = at(best)
    return ReplicaSpeed(
        concurrency=best, limited_by=limit, prefill_ms=t_p * 1e3, step_ms=t_s * 1e3, ttft_ms=ttft * 1e3,
        ttft_max_input_ms=(prefill(w.max_input_tokens) + t_s) * 1e3, tpot_ms=tpot * 1e3,
        e2e_s=ttft + w.output_tokens * tpot, requests_per_s=lam, output_tokens_per_s=lam * w.output_tokens,
    )  # fmt: skip


def _slo_broken(ttft_s: float, tpot_s: float, w: Workload) -> str | None:
    if w.tpot_slo_ms is not None and tpot_s * 1e3 > w.tpot_slo_ms:
        return f"TPOT ≈ {tpot_s * 1e3:.0f} ms > SLO {w.tpot_slo_ms:g} ms"
    if w.ttft_slo_ms is not None and ttft_s * 1e3 > w.ttft_slo_ms:
        return f"TTFT ≈ {ttft_s * 1e3:.0f} ms > SLO {w.ttft_slo_ms:g} ms"
    return None
