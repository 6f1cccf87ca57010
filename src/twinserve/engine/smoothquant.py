"""SmoothQuant for `quantize=int8`: move activation outliers into the weights first.

Dynamic int8 quantizes each token's activations with one scale, so a few channels
hundreds of times larger than the rest (the input of `down_proj` above all) leave the
other channels a handful of levels. Measured on SmolLM2-135M, plain int8 picked the
same next token as fp32 only about half the time. SmoothQuant (Xiao et al., 2023)
divides each input channel j of a linear by s_j and multiplies the weight's column j
by s_j. In exact arithmetic the model is unchanged; what changes is that both sides
become easy to quantize.

s_j = max|X_j|^α / max|W_j|^(1-α). The activation maxima come from running the
calibration tokens through each layer at full precision, one layer at a time, as the
layers load. Each division is folded into the op before the linear, so inference
pays nothing:
- input of qkv and gate_up: the RMSNorm weight before it;
- input of down_proj: the rows of up_proj (silu(gate) * up/s = (silu(gate) * up)/s);
- input of o_proj: the rows of v_proj, since attention output channel d is a weighted
  sum of V channel d. Query heads that share a KV head share the scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from twinserve.engine.kv_cache import SlotKVCache
from twinserve.engine.layers import PlainLinear

if TYPE_CHECKING:
    from twinserve.engine.models.llama import LayerWeights, LlamaModel

ALPHA = 0.7
_FLOOR = 1e-5

# What int8 calibrates on: general prose and chat turns, rendered with the model's chat
# template where it has one (its special tokens carry some of the largest activations).
CALIBRATION_TEXTS = (
    "The history of the printing press begins in the fifteenth century, when movable type made "
    "books cheap enough for merchants, students and clergy. Within fifty years presses were "
    "running in more than two hundred European cities, and the price of a bible fell tenfold.",
    "To deploy a model to production, export the weights, register a version with its metrics, "
    "run the evaluation suite against the current champion, and promote it only when it wins. "
    "Roll the endpoint forward gradually and watch latency, errors and cost before going further.",
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. Chlorophyll "
    "absorbs red and blue light and reflects green, which is why leaves look green to us.",
)
CALIBRATION_QUESTIONS = (
    "What is the capital of France, and why is it famous?",
    "Write a short poem about the sea.",
    "Explain what a neural network is to a ten-year-old.",
    "How do I reverse a list in Python?",
)


def calibration_token_ids(tokenizer: object) -> list[list[int]]:
    """The calibration sequences as token ids (chat turns only when a chat template exists)."""
    encode = tokenizer  # a transformers tokenizer: callable, with apply_chat_template
    ids: list[list[int]] = [encode(text)["input_ids"] for text in CALIBRATION_TEXTS]  # type: ignore[operator]
    if getattr(tokenizer, "chat_template", None):
        for question, answer in zip(CALIBRATION_QUESTIONS, CALIBRATION_TEXTS, strict=True):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)  # type: ignore[attr-defined]
            ids.append(encode(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    return ids


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor) -> torch.Tensor:
    """Per input channel s_j = max|X_j|^α / max|W_j|^(1-α), α = ALPHA."""
    w_max = weight_absmax.clamp(min=_FLOOR)
    return (act_absmax.clamp(min=_FLOOR).pow(ALPHA) / w_max.pow(1 - ALPHA)).clamp(min=_FLOOR)


def _column_absmax(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().amax(dim=0)


class _ObservedLinear(PlainLinear):
    """A full-precision linear that remembers the largest |input| of each channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        self.absmax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seen = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
        self.absmax = seen if self.absmax is None else torch.maximum(self.absmax, seen)
        return super().__call__(x)

    def input_absmax(self) -> torch.Tensor:
        assert self.absmax is not None, "the layer has not run yet"
        return self.absmax


class Smoother:
    """Runs the calibration tokens through each layer as it loads and smooths that layer."""

    def __init__(self, model: LlamaModel, calibration_ids: list[list[int]]) -> None:
        from twinserve.engine.models.llama import ForwardBatch

        self.model = model
        shape = model.shape
        # equal lengths, so no padding token's activations enter the maxima
        width = min(len(ids) for ids in calibration_ids)
        rows = torch.tensor([ids[:width] for ids in calibration_ids], dtype=torch.long, device=model.device)
        n = rows.shape[0]
        self.batch = ForwardBatch(
            input_ids=rows,
            positions=torch.arange(width, device=model.device).expand(n, width),
            slots=torch.arange(n, device=model.device),
            is_prefill=True,
            attn_len=width,
            lengths=torch.full((n,), width, device=model.device),
        )
        # int8 runs in float32 (act_dtype), so embeddings and rope tables already are
        self.hidden = F.embedding(rows.reshape(-1), model.embed)
        self.cache = SlotKVCache(1, shape.num_kv_heads, shape.head_dim, torch.float32, model.device)
        self.cache.fit(n, width, 0, n * width)
        self.cos, self.sin = model.rope(self.batch)
        self.window = model.window_mask(self.batch)
        self.layer_index = 0  # of the model; the calibration cache holds one layer at a time

    def smooth(self, raw: LayerWeights) -> LayerWeights:
        """This layer's tensors with the scales folded in; moves the calibration on by one layer."""
        raw = raw.float()
        layer = self.model.build_layer(raw, _ObservedLinear)
        sliding = self.window if self.model.shape.layer_windows[self.layer_index] is not None else None
        self.hidden = self.model.layer_forward(
            layer, 0, self.hidden, self.cos, self.sin, self.batch, self.cache, sliding
        )
        self.layer_index += 1
        qkv_in, o_in, gate_up_in, down_in = (
            lin.input_absmax()  # type: ignore[attr-defined]
            for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
        )
        return self._fold(raw, qkv_in, o_in, gate_up_in, down_in)

    def smooth_head(self, norm: torch.Tensor, lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm and LM head with the head's input scales folded in (after the last layer)."""
        from twinserve.engine.models.llama import rms_norm

        norm, lm_head = norm.float(), lm_head.float()
        x = rms_norm(self.hidden, norm, self.model.shape.rms_norm_eps)
        scales = smoothing_scales(x.abs().amax(dim=0), _column_absmax(lm_head))
        return norm / scales, lm_head * scales

    def _fold(
        self,
        raw: LayerWeights,
        qkv_in: torch.Tensor,
        o_in: torch.Tensor,
        gate_up_in: torch.Tensor,
        down_in: torch.Tensor,
    ) -> LayerWeights:
        from twinserve.engine.models.llama import LayerWeights

        shape = self.model.shape
        n_q, n_kv, hd = shape.num_heads, shape.num_kv_heads, shape.head_dim
        group = n_q // n_kv
        qkv, o_proj, gate_up, down = (
            raw.qkv.clone(),
            raw.o_proj.clone(),
            raw.gate_up.clone(),
            raw.down.clone(),
        )
        qkv_bias = None if raw.qkv_bias is None else raw.qkv_bias.clone()

        s_qkv = smoothing_scales(qkv_in, _column_absmax(qkv))
        qkv *= s_qkv
        s_gate_up = smoothing_scales(gate_up_in, _column_absmax(gate_up))
        gate_up *= s_gate_up
        s_down = smoothing_scales(down_in, _column_absmax(down))
        down *= s_down
        gate_up[gate_up.shape[0] // 2 :] /= s_down[:, None]  # the up_proj rows
        # o_proj: one scale per V channel, shared by the query heads of that KV head
        s_v = smoothing_scales(
            o_in.view(n_kv, group, hd).amax(dim=1), _column_absmax(o_proj).view(n_kv, group, hd).amax(dim=1)
        )
        o_proj *= s_v[:, None, :].expand(n_kv, group, hd).reshape(-1)
        v_rows = slice((n_q + n_kv) * hd, None)
        qkv[v_rows] /= s_v.reshape(-1)[:, None]
        if qkv_bias is not None:
            qkv_bias[v_rows] /= s_v.reshape(-1)
        return LayerWeights(
            input_norm=raw.input_norm / s_qkv,
            qkv=qkv,
            qkv_bias=qkv_bias,
            o_proj=o_proj,
            o_bias=raw.o_bias,
            post_norm=raw.post_norm / s_gate_up,
            gate_up=gate_up,
            down=down,
        )
