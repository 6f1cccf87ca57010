"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) written for serving.

Why not call the transformers model: its forward costs ~9 ms of framework overhead
per decode step at this size, pads the batch, and keeps one position per batch. Here
every layer does the fewest ops we can (fused QKV and gate/up projections, one RoPE
for q and k together), reads and writes a slot KV cache where each request keeps its
own position, and computes the LM head only for the rows that need logits.

Weights come from the same safetensors files and names as transformers, so greedy
output matches `generate` token for token in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from twinserve.engine.fused import FusedOps, fused_ops
from twinserve.engine.kv_cache import SlotKVCache
from twinserve.engine.layers import Linear, make_linear
from twinserve.engine.memory import trim_heap
from twinserve.engine.models.architecture import ModelShape, rope_parameters
from twinserve.engine.models.checkpoint_config import CheckpointConfig
from twinserve.errors import ModelLoadError

# Queries per row up to which the compiled kernel computes the attention of a pass through the
# cache (decode 1, a verifying pass 1 + drafts); it reads a row's keys once per query, where
# SDPA's blocked kernel shares them, so longer ragged prefills keep SDPA.
MAX_KERNEL_QUERIES = 16


@dataclass(frozen=True)
class DecoderLayer:
    input_norm: torch.Tensor
    qkv: Linear
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors as the checkpoint holds them, QKV and gate/up fused."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    def float(self) -> LayerWeights:
        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.float()

        return LayerWeights(
            input_norm=self.input_norm.float(),
            qkv=self.qkv.float(),
            qkv_bias=f(self.qkv_bias),
            o_proj=self.o_proj.float(),
            o_bias=f(self.o_bias),
            post_norm=self.post_norm.float(),
            gate_up=self.gate_up.float(),
            down=self.down.float(),
        )


def read_layer(
    prefix: str,
    take: Callable[[str], torch.Tensor],
    maybe: Callable[[str], torch.Tensor | None],
) -> LayerWeights:
    """The tensors of the layer under `prefix`, taken out of the checkpoint."""
    q, k, v = (take(prefix + f"self_attn.{n}_proj.weight") for n in "qkv")
    biases = [maybe(prefix + f"self_attn.{n}_proj.bias") for n in "qkv"]
    return LayerWeights(
        input_norm=take(prefix + "input_layernorm.weight"),
        qkv=torch.cat([q, k, v]),
        qkv_bias=None if biases[0] is None else torch.cat([b for b in biases if b is not None]),
        o_proj=take(prefix + "self_attn.o_proj.weight"),
        o_bias=maybe(prefix + "self_attn.o_proj.bias"),
        post_norm=take(prefix + "post_attention_layernorm.weight"),
        gate_up=torch.cat([take(prefix + "mlp.gate_proj.weight"), take(prefix + "mlp.up_proj.weight")]),
        down=take(prefix + "mlp.down_proj.weight"),
    )


@dataclass(frozen=True)
class ForwardBatch:
    """What one forward pass needs to know about the rows it computes.

    Decode: `input_ids` [B], one token per row at `positions` [B] in cache slot `slots` [B],
    `attn_len` = max(positions) + 1. Verify (speculative decoding): `input_ids` [B, W], row i's
    tokens at `positions[i]` = its own consecutive positions, each attending causally up to
    itself through `decode_mask` [B, 1, W, attn_len]. Prefill: `input_ids` [n, L] right-padded,
    row i holds `lengths[i]` real tokens at positions prefix_len..prefix_len+lengths[i]-1 and
    writes slot `slots[i]`; positions below `prefix_len` are already in every row's slot (a
    shared prefix).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    is_prefill: bool
    attn_len: int
    decode_mask: torch.Tensor | None = None  # [B, 1, 1 or W, attn_len] bool, True = attend
    lengths: torch.Tensor | None = None  # prefill only
    first_slot: int | None = None  # the rows are slots first_slot.. in order: cache views serve them
    prefix_len: int = 0  # prefill only: cached positions the new tokens continue from
    _biases: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )
    _prefix_biases: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def slots_contiguous(self) -> bool:
        """The rows are slots 0..B-1 in order (what the decode kernel reads)."""
        return self.first_slot == 0

    def rows_of(self, cache: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 of every row's slot in a layer's K or V cache: a view where the
        rows are consecutive slots, else a gather (a copy)."""
        if self.first_slot is not None:
            rows = self.slots.shape[0]
            return cache[self.first_slot : self.first_slot + rows, :, start:end]
        return cache[self.slots, :, start:end]

    @property
    def is_verify(self) -> bool:
        """Several tokens per row at each row's own positions (drafted tokens to check)."""
        return not self.is_prefill and self.input_ids.dim() == 2

    def grouped_bias(self, mask: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
        """A verify mask [B, 1, W, keys] as the additive bias of `group` query heads stacked
        along the query axis, [B, 1, group·W, keys]; made once per pass, not per layer."""
        key = (id(mask), group, dtype)
        bias = self._biases.get(key)
        if bias is None:
            rows, _, width, keys = mask.shape
            zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            bias = zeros.masked_fill_(~mask, float("-inf")).expand(rows, group, width, keys)
            bias = bias.reshape(rows, 1, group * width, keys)
            self._biases[key] = bias
        return bias

    def prefix_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """A prefill's causal mask over the cached prefix and its own tokens, [width, attn_len],
        as the additive bias SDPA turns a boolean mask into; made once per pass, not per layer."""
        bias = self._prefix_biases.get(dtype)
        if bias is None:
            mask = _key_mask(self, None)
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._prefix_biases[dtype] = bias
        return bias

    @functools.cached_property
    def token_slots(self) -> torch.Tensor:
        """The cache slot of every token of the pass (a verify row's W tokens share its slot)."""
        if self.input_ids.dim() == 2:  # a verifying pass or a prefill: W tokens a row
            return self.slots.repeat_interleave(self.input_ids.shape[1])
        return self.slots

    @functools.cached_property
    def key_lengths(self) -> torch.Tensor:
        """The keys each token of a decode or verify pass attends to, its own included (once per pass)."""
        return self.positions.reshape(-1) + 1


class LlamaModel:
    """Forward pass over a slot KV cache; holds no per-request state."""

    def __init__(
        self,
        config: Any,
        weights: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        quantize: str | None = None,
        attention: str = "sdpa",
        calibration_ids: list[list[int]] | None = None,
    ) -> None:
        """`calibration_ids`: token sequences that int8 calibrates its smoothing on."""
        self.config = config
        self.shape = s = ModelShape.from_config(config)
        if quantize == "int4":  # its CPU kernel is fast in bf16 only
            dtype = torch.bfloat16
        self.dtype = dtype
        # int8 dynamic quantization computes in fp32; activations and cache follow it
        self.act_dtype = torch.float32 if quantize == "int8" else dtype
        self.device = device
        self.attention = attention

        expected = _expected_shapes(s)

        def maybe(name: str) -> torch.Tensor | None:
            t = weights.pop(name, None)
            if t is None:
                return None
            if name in expected and tuple(t.shape) != expected[name]:
                raise ModelLoadError(
                    f"weight {name!r} has shape {tuple(t.shape)}, the config implies {expected[name]}"
                )
            return t.to(device)

        def take(name: str) -> torch.Tensor:
            t = maybe(name)
            if t is None:
                raise ModelLoadError(f"weight {name!r} missing from the checkpoint")
            return t

        def linear(w: torch.Tensor, b: torch.Tensor | None) -> Linear:
            return make_linear(w, b, quantize=quantize, dtype=dtype)

        self.embed = take("model.embed_tokens.weight").to(self.act_dtype)
        self._rope_inv_freq, self._rope_scaling = _rope_parameters(config, device)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._flash = _flash_attn_func() if attention == "flash_attention_2" else None
        self.fused: FusedOps | None = fused_ops(device)
        # int8 quantizes activations too: outliers are first moved into the weights (SmoothQuant)
        smoother = None
        if quantize == "int8" and calibration_ids:
            from twinserve.engine.smoothquant import Smoother

            smoother = Smoother(self, calibration_ids)
        self.layers: list[DecoderLayer] = []
        for i in range(s.num_layers):
            raw = read_layer(f"model.layers.{i}.", take, maybe)
            if smoother is not None:
                raw = smoother.smooth(raw)
            self.layers.append(self.build_layer(raw, linear))
            del raw
            trim_heap()  # the layer's unfused and unpacked tensors are free now
        norm = take("model.norm.weight")
        lm_head = maybe("lm_head.weight")
        if s.tie_word_embeddings:
            lm_head = self.embed
        elif lm_head is None:
            raise ModelLoadError("weight 'lm_head.weight' missing and tie_word_embeddings is false")
        if smoother is not None:
            norm, lm_head = smoother.smooth_head(norm, lm_head)
        self.norm = norm.to(self.act_dtype)
        # int8 quantizes the LM head too, smoothed like the layers: it cost 0.3 points of top-1
        # agreement with fp32 and saves ~1 ms of a single-stream step. int4 keeps it in int8
        # as well: fbgemm runs this one wide matrix faster than the int4 kernel, and 4-bit
        # logits cost 7 points of top-1 agreement. bitsandbytes keeps it in the compute dtype,
        # as transformers does
        head_quantize = "int8" if quantize in ("int8", "int4") else None
        self.lm_head = make_linear(lm_head, None, quantize=head_quantize, dtype=dtype)

    def build_layer(
        self, raw: LayerWeights, linear: Callable[[torch.Tensor, torch.Tensor | None], Linear]
    ) -> DecoderLayer:
        """A layer from its (possibly smoothed) tensors, each projection as `linear` makes it."""
        return DecoderLayer(
            input_norm=raw.input_norm.to(self.act_dtype),
            qkv=linear(raw.qkv, raw.qkv_bias),
            o_proj=linear(raw.o_proj, raw.o_bias),
            post_norm=raw.post_norm.to(self.act_dtype),
            gate_up=linear(raw.gate_up, None),
            down=linear(raw.down, None),
        )

    # ----------------------------------------------------------------- rope
    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for positions < length, computed like transformers (fp32, then cast).

        rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: negating sin instead of x is
        exact, and one roll replaces two slices, a negation and a cat per layer.
        """
        if self._cos is None or self._cos.shape[0] < length:
            size = max(length, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            pos = torch.arange(size, device=self.device, dtype=torch.float32)
            freqs = pos[:, None] * self._rope_inv_freq[None, :].float()
            emb = torch.cat([freqs, freqs], dim=-1)
            cos = (emb.cos() * self._rope_scaling).to(self.act_dtype)
            sin = (emb.sin() * self._rope_scaling).to(self.act_dtype)
            half = sin.shape[-1] // 2
            self._cos = cos
            self._sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        assert self._sin is not None
        return self._cos, self._sin

    # -------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, cache: SlotKVCache, logits_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the layers, fill the cache, return fp32 logits for the rows in `logits_index`.

        `logits_index` indexes the flattened token dimension; None = the last real token
        of every row (prefill) or every row (decode).
        """
        if logits_index is None and batch.is_prefill:
            logits_index = _last_tokens(batch)
        if self.fused is not None:
            return self._fused_forward(self.fused, batch, cache, logits_index)
        ids = batch.input_ids
        h = F.embedding(ids.reshape(-1), self.embed)
        cos, sin = self.rope(batch)
        window = self.window_mask(batch)
        for index, layer in enumerate(self.layers):
            sliding = window if self.shape.layer_windows[index] is not None else None
            h = self.layer_forward(layer, index, h, cos, sin, batch, cache, sliding)
        if logits_index is not None:
            h = h[logits_index]
        h = rms_norm(h, self.norm, self.shape.rms_norm_eps)
        return self.lm_head(h).float()

    def window_mask(self, batch: ForwardBatch) -> SlidingWindow | None:
        """The keys the queries of a sliding-window layer may attend to; None where nothing is cut.

        As transformers applies `sliding_window` w: the query at position p sees keys at
        p - w < j <= p, so the window cuts only once a position reaches w. Keys left of every
        query's window are not read at all (a single decode row reads exactly w keys, like
        transformers' sliding cache); a mask covers the rest where rows see different keys.
        """
        w = self.shape.sliding_window
        if w is None or batch.attn_len <= w:
            return None
        first_query = batch.prefix_len if batch.is_prefill else int(batch.positions.min())
        start = max(0, first_query - w + 1)
        mask = _key_mask(batch, w)[..., start:]
        # one decode row, or rows at one position: every kept key is visible
        return SlidingWindow(start, None if not batch.is_prefill and bool(mask.all()) else mask)

    def rope(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin of every token of the batch, shaped to broadcast over heads."""
        cos_t, sin_t = self._rope_tables(int(batch.positions.max()) + 1)
        flat = batch.positions.reshape(-1)
        return cos_t[flat][:, None, :], sin_t[flat][:, None, :]

    def layer_forward(
        self,
        layer: DecoderLayer,
        index: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        cache: SlotKVCache,
        window: SlidingWindow | None = None,
    ) -> torch.Tensor:
        """One decoder layer over the flattened tokens `h`; writes its K/V to `cache` layer `index`.

        `window`: `window_mask(batch)` when this layer has a sliding window that cuts, else None.
        """
        s = self.shape
        n_q, n_kv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        x = rms_norm(h, layer.input_norm, s.rms_norm_eps)
        qkv = layer.qkv(x)
        qk = qkv[:, : (n_q + n_kv) * hd].view(-1, n_q + n_kv, hd)
        qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin  # rounded like transformers
        q, k = qk[:, :n_q], qk[:, n_q:]
        v = qkv[:, (n_q + n_kv) * hd :].view(-1, n_kv, hd)
        if batch.is_prefill:
            attn = self._prefill_attention(batch, cache, index, q, k, v, window)
        else:
            attn = self._decode_attention(batch, cache, index, q, k, v, window)
        h = h + layer.o_proj(attn)
        x = rms_norm(h, layer.post_norm, s.rms_norm_eps)
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return h + layer.down(F.silu(gate, inplace=True).mul_(up))

    def _fused_forward(
        self, fused: FusedOps, batch: ForwardBatch, cache: SlotKVCache, logits_index: torch.Tensor | None
    ) -> torch.Tensor:
        """`forward` through the compiled kernels (`engine/fused.py`), for every kind of pass.

        Each residual add is fused with the RMSNorm after it: the next layer's input norm,
        or the final norm after the last layer. A prefill writes its K/V into the cache
        first, like a decode row, and attends over what it wrote.
        """
        s = self.shape
        eps = s.rms_norm_eps
        h = F.embedding(batch.input_ids.reshape(-1), self.embed)
        cos, sin = self.rope(batch)
        window = self.window_mask(batch)
        x = fused.rms_norm(h, self.layers[0].input_norm, eps)
        width = batch.input_ids.shape[1] if batch.is_verify else 1
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        for index, (layer, next_norm) in enumerate(zip(self.layers, next_norms, strict=True)):
            k_cache, v_cache = cache.layer(index)
            q = fused.rope_write_kv(
                layer.qkv(x), cos, sin, k_cache, v_cache, batch.token_slots, batch.positions,
                s.num_heads, s.num_kv_heads, s.head_dim,
            )  # fmt: skip
            sliding = window if s.layer_windows[index] is not None else None
            if batch.is_prefill:
                attn = self._prefill_attention_over_cache(batch, k_cache, v_cache, q, sliding)
            elif sliding is None and batch.slots_contiguous and width <= MAX_KERNEL_QUERIES:
                attn = fused.decode_attention(q, k_cache, v_cache, batch.key_lengths, s.head_dim**-0.5, width)
            else:  # rows in other slots, a cutting window, or a long ragged prefill: SDPA
                attn = self._sdpa_decode(batch, k_cache, v_cache, q, sliding)
            h, x = fused.add_rms_norm(h, layer.o_proj(attn), layer.post_norm, eps)
            h, x = fused.add_rms_norm(h, layer.down(fused.silu_mul(layer.gate_up(x))), next_norm, eps)
        if logits_index is not None:
            x = x[logits_index]
        return self.lm_head(x).float()

    def _decode_attention(
        self,
        batch: ForwardBatch,
        cache: SlotKVCache,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: SlidingWindow | None,
    ) -> torch.Tensor:
        if batch.is_verify:
            return self._verify_attention(batch, cache, layer, q, k, v, window)
        k_cache, v_cache = cache.layer(layer)
        k_cache[batch.slots, :, batch.positions] = k
        v_cache[batch.slots, :, batch.positions] = v
        return self._sdpa_decode(batch, k_cache, v_cache, q, window)

    def _verify_attention(
        self,
        batch: ForwardBatch,
        cache: SlotKVCache,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: SlidingWindow | None,
    ) -> torch.Tensor:
        """W tokens per row, each at its row's own position: write their K/V where they sit,
        then attend over the row's cache with the per-row causal mask."""
        s = self.shape
        n, width = batch.input_ids.shape
        k_cache, v_cache = cache.layer(layer)
        # [n, 1] with [n, W] index the slot and position dims: the values are [n, W, kv_heads, head_dim]
        where = (batch.slots[:, None], slice(None), batch.positions)
        k_cache[where] = k.reshape(n, width, s.num_kv_heads, s.head_dim)
        v_cache[where] = v.reshape(n, width, s.num_kv_heads, s.head_dim)
        return self._sdpa_decode(batch, k_cache, v_cache, q, window)

    def _sdpa_decode(
        self,
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q: torch.Tensor,
        window: SlidingWindow | None,
    ) -> torch.Tensor:
        """Decode or verify rows' attention over the cache, their K/V already written, through SDPA.

        GQA: the query heads of one KV head, at all of a row's W positions (1 at decode), act
        as one query sequence, so no K/V repeat is needed and the CPU flash kernel gets blocks
        it fills better than W alone.
        """
        s = self.shape
        n = batch.slots.shape[0]
        width = batch.input_ids.shape[1] if batch.is_verify else 1
        keys, values, mask = _decode_keys(batch, k_cache, v_cache, window)
        n_kv, group, hd = s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim
        qg = q.reshape(n, width, n_kv, group, hd).permute(0, 2, 3, 1, 4).reshape(n, n_kv, group * width, hd)
        if mask is not None and width > 1:  # at decode the [B, 1, 1, keys] mask broadcasts as it is
            mask = batch.grouped_bias(mask, group, q.dtype)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        return out.view(n, n_kv, group, width, hd).permute(0, 3, 1, 2, 4).reshape(n * width, s.num_heads * hd)

    def _prefill_attention(
        self,
        batch: ForwardBatch,
        cache: SlotKVCache,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: SlidingWindow | None,
    ) -> torch.Tensor:
        s = self.shape
        n, width = batch.input_ids.shape
        q4 = q.view(n, width, s.num_heads, s.head_dim)
        k4 = k.reshape(n, width, s.num_kv_heads, s.head_dim)
        v4 = v.reshape(n, width, s.num_kv_heads, s.head_dim)
        k_cache, v_cache = cache.layer(layer)
        start = batch.prefix_len
        # right padding: pad positions land beyond each row's length and are masked later
        k_cache[batch.slots, :, start : start + width] = k4.transpose(1, 2)
        v_cache[batch.slots, :, start : start + width] = v4.transpose(1, 2)
        if self._flash is not None and not start:
            # flash-attn's window counts the keys left of the query: w - 1 plus the query itself
            sliding = (-1, -1) if window is None else (s.sliding_window - 1, 0)  # type: ignore[operator]
            out = self._flash(q4, k4, v4, causal=True, window_size=sliding)
            return out.reshape(n * width, s.num_heads * s.head_dim)
        return self._prefill_attention_over_cache(batch, k_cache, v_cache, q, window)

    def _prefill_attention_over_cache(
        self,
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q: torch.Tensor,
        window: SlidingWindow | None,
    ) -> torch.Tensor:
        """A prefill's attention over the cache, its K/V already written there."""
        s = self.shape
        n, width = batch.input_ids.shape
        q4 = q.view(n, width, s.num_heads, s.head_dim)
        if batch.prefix_len:
            return self._prefix_attention(batch, k_cache, v_cache, q4, window)
        keys, values = batch.rows_of(k_cache, 0, width), batch.rows_of(v_cache, 0, width)
        out = F.scaled_dot_product_attention(
            q4.transpose(1, 2),
            keys,
            values,
            attn_mask=None if window is None else window.mask,  # start is 0: the first query is at 0
            is_causal=window is None,
            enable_gqa=s.num_heads != s.num_kv_heads,
        )
        return out.transpose(1, 2).reshape(n * width, s.num_heads * s.head_dim)

    def _prefix_attention(
        self,
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q4: torch.Tensor,
        window: SlidingWindow | None,
    ) -> torch.Tensor:
        """New tokens attend to the shared prefix in the cache and causally to each other."""
        s = self.shape
        n, width = batch.input_ids.shape
        total = batch.prefix_len + width
        # query i sits at position prefix_len + i and sees keys up to there
        start, mask = (0, batch.prefix_bias(q4.dtype)) if window is None else (window.start, window.mask)
        keys, values = batch.rows_of(k_cache, start, total), batch.rows_of(v_cache, start, total)
        out = F.scaled_dot_product_attention(
            q4.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=s.num_heads != s.num_kv_heads
        )
        return out.transpose(1, 2).reshape(n * width, s.num_heads * s.head_dim)


@dataclass(frozen=True)
class SlidingWindow:
    """Where a sliding-window layer's keys begin, and which of them each query sees (None = all)."""

    start: int
    mask: torch.Tensor | None


def _last_tokens(batch: ForwardBatch) -> torch.Tensor:
    """The flat index of every prefill row's last real token (right padding)."""
    assert batch.lengths is not None
    n, width = batch.input_ids.shape
    return torch.arange(n, device=batch.input_ids.device) * width + batch.lengths - 1


def _decode_keys(
    batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor, window: SlidingWindow | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The cached keys and values decode (or verify) rows attend to, and the mask over them."""
    start, mask = (0, batch.decode_mask) if window is None else (window.start, window.mask)
    return batch.rows_of(k_cache, start, batch.attn_len), batch.rows_of(v_cache, start, batch.attn_len), mask


def _key_mask(batch: ForwardBatch, window: int | None) -> torch.Tensor:
    """Causal mask over absolute positions (within `window` if given), True = attend.

    Decode: [B, 1, 1, attn_len], one query per row at its own position; verify: [B, 1, W, attn_len].
    Prefill: [width, attn_len] for the queries at positions prefix_len.. that every row shares.
    """
    device = batch.positions.device
    keys = torch.arange(batch.attn_len, device=device)
    if batch.is_prefill:
        width = batch.input_ids.shape[1]
        queries = (torch.arange(width, device=device) + batch.prefix_len)[:, None]
    else:
        queries = batch.positions.reshape(batch.positions.shape[0], -1)[..., None]  # [B, W, 1]
    mask = keys <= queries
    if window is not None:
        mask &= keys > queries - window
    return mask if batch.is_prefill else mask[:, None]


def _expected_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint may hold, with the shape the config implies."""
    h = shape.hidden_size
    expected: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (shape.vocab_size, h),
        "lm_head.weight": (shape.vocab_size, h),
        "model.norm.weight": (h,),
    }
    for i in range(shape.num_layers):
        expected.update(shape.expected_shapes(f"model.layers.{i}."))
    return expected


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm rounded like transformers: normalise in fp32, cast, then scale in the model dtype.

    Scaling in fp32 instead is more precise but moves bf16 results off the ones the
    model was evaluated with; at near-ties of the top logits that flips greedy tokens.
    torch normalises a 16-bit input in fp32 and rounds once, which is bit-identical to
    upcasting first (tests/unit/engine/test_rms_norm.py) and saves two ops per call.
    """
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


def _rope_parameters(config: Any, device: torch.device) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as transformers computes them (every supported rope type).

    From transformers' rope functions, not its Llama module: importing modeling_llama costs
    ~2 s of every replica's start, for one formula.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        if isinstance(config, CheckpointConfig):  # transformers' functions take its own config class
            config = config.transformers_config()
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)  # on the CPU, as transformers does
        return inv_freq.to(device), float(scaling)
    # LlamaRotaryEmbedding.compute_default_rope_parameters (Mistral's and Qwen2's are the same)
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq.to(device), 1.0


def _flash_attn_func() -> Any:
    try:
        from flash_attn import flash_attn_func
    except ImportError as exc:  # pragma: no cover - GPU only
        raise ModelLoadError("attention=flash_attention_2 needs the flash-attn package") from exc
    return flash_attn_func
