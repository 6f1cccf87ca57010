"""Linear layers in the form each device and quantization multiplies fastest.

The model code only calls `linear(x)`; which kernel runs is decided once at load
time. Why each exists (measured on the 2-core AMX CPU, see PERF-NOTES):
- `PackedBf16Linear`: oneDNN-prepacked bf16 weights run a decode step ~1.7x faster
  than plain `F.linear` at batch 1 and ~1.4x at batch 32.
- `DynamicInt8Linear`: int8 weights with per-channel scales, fp32 activations
  quantized on the fly (torch dynamic quantization, fbgemm); half the bytes of bf16.
- `Int4Linear`: 4-bit weights in groups of 32 with a scale and a minimum each (llama.cpp's
  Q4_1 layout), bf16 activations, torch's AVX512 int4 kernel; a quarter of bf16's bytes.
- `BitsAndBytesLinear`: bitsandbytes 8-bit / NF4, the kernels TGI's `QUANTIZE` names.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
import torch.nn.functional as F

from twinserve.errors import ModelLoadError

INT4_GROUP = 32  # input channels per scale and minimum (llama.cpp's Q4_1 block)

# oneDNN picks its blocked layout for this batch size; measured fast for M = 1..512.
_PACK_BATCH_HINT = 32


class Linear(Protocol):
    """Anything that maps [..., in] to [..., out]."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class PlainLinear:
    """`F.linear`; what GPUs and fp32 CPUs use."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedBf16Linear:
    """bf16 weights reordered once into oneDNN's blocked layout (CPU with AMX/AVX512-BF16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        self.bias = bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    @staticmethod
    def supported() -> bool:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class DynamicInt8Linear:
    """int8 per-channel weights, activations quantized per call (torch dynamic quantization).

    Calls the op's bound kernel directly: the `torch.ops` packet's Python dispatch check
    costs ~3 µs a call, ~5% of a single-stream decode step with 121 of these per token.
    """

    _kernel = torch.ops.quantized.linear_dynamic.default._op

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.float()
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch; fbgemm still takes them
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                w,
                scales=(w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double(),
                zero_points=torch.zeros(w.shape[0], dtype=torch.long),
                axis=0,
                dtype=torch.qint8,
            )
        self.packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._kernel(x.reshape(-1, shape[-1]).float(), self.packed)
        return y.reshape(*shape[:-1], self.out_features)


class Int4Linear:
    """4-bit weights, groups of `INT4_GROUP` input channels each with its own scale and minimum.

    What llama.cpp's Q4_1 stores, run by torch's CPU int4 weight-only kernel
    (`_weight_int4pack_mm_for_cpu`, the one torchao and gpt-fast use): it reads a quarter of
    bf16's bytes, so a single-stream decode step, bound by reading the weights, gets faster;
    at 4 or more rows the kernel is slower than oneDNN's bf16 (see docs/engine.md).
    """

    _kernel = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    _N_MULTIPLE = 16  # the kernel packs output channels in blocks of 16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype) -> None:
        out_features, in_features = weight.shape
        if in_features % INT4_GROUP:
            raise ModelLoadError(
                f"quantize=int4 needs input sizes divisible by {INT4_GROUP}; a layer has {in_features}"
            )
        w = weight.float()
        padded = -(-out_features // self._N_MULTIPLE) * self._N_MULTIPLE
        if padded != out_features:  # zero rows, sliced off the output
            w = torch.cat([w, w.new_zeros(padded - out_features, in_features)])
        groups = w.reshape(padded, in_features // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        # the kernel computes (q - 8) * scale + zero; quantize against the rounded scale and zero
        scale = ((high - low) / 15).clamp(min=1e-8).to(dtype)
        zero = (low + 8 * scale.float()).to(dtype)
        q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).reshape(padded, in_features), 1
        )
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
        self.bias = None if bias is None else bias.to(dtype)
        self.dtype = dtype
        self.out_features = out_features
        self._padded = padded != out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(self.dtype).contiguous()  # the kernel takes dense rows only
        y = self._kernel(rows, self.packed, INT4_GROUP, self.scales_and_zeros)
        if self._padded:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class BitsAndBytesLinear:
    """bitsandbytes 8-bit (LLM.int8) or NF4 weights, configured like transformers' BitsAndBytesConfig."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, *, four_bit: bool, compute_dtype: torch.dtype
    ) -> None:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # pragma: no cover - depends on the [gpu] extra
            raise ModelLoadError(
                "quantize=bitsandbytes needs the bitsandbytes package: pip install 'twinserve[gpu]'"
            ) from exc
        out_features, in_features = weight.shape
        device = weight.device
        module: torch.nn.Module
        if four_bit:
            module = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            module.weight = bnb.nn.Params4bit(
                weight.to(compute_dtype).cpu(), requires_grad=False, quant_type="nf4"
            )
        else:
            module = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            module.weight = bnb.nn.Int8Params(
                weight.to(compute_dtype).cpu(), requires_grad=False, has_fp16_weights=False
            )
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.to(compute_dtype).cpu(), requires_grad=False)
        self.module = module.to(device)  # moving to the device is what quantizes
        self.compute_dtype = compute_dtype
        self.out_features = out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.compute_dtype))


def make_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    quantize: str | None,
    dtype: torch.dtype,
) -> Linear:
    """Choose the fastest linear for this device, dtype and quantization."""
    if quantize == "int8":
        if weight.device.type != "cpu":
            raise ModelLoadError("quantize=int8 is the CPU dynamic quantization; use bitsandbytes on GPU")
        return DynamicInt8Linear(weight, bias)
    if quantize == "int4":
        if weight.device.type != "cpu":
            raise ModelLoadError("quantize=int4 is a CPU kernel; on GPU use bitsandbytes-nf4")
        return Int4Linear(weight, bias, dtype=dtype)
    if quantize in ("bitsandbytes", "bitsandbytes-nf4"):
        return BitsAndBytesLinear(weight, bias, four_bit=quantize == "bitsandbytes-nf4", compute_dtype=dtype)
    if quantize is not None:
        raise ModelLoadError(f"unknown quantization {quantize!r}")
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if weight.device.type == "cpu" and dtype == torch.bfloat16 and PackedBf16Linear.supported():
        return PackedBf16Linear(weight, bias)
    return PlainLinear(weight, bias)
