"""SmoothQuant for int8: smoothing leaves the full-precision model unchanged and helps int8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tests.factories import tiny_llama_dir
from twinserve.engine.kv_cache import SlotKVCache
from twinserve.engine.layers import DynamicInt8Linear, PlainLinear
from twinserve.engine.loader import read_weights, safetensors_files
from twinserve.engine.models.llama import ForwardBatch, LlamaModel, read_layer
from twinserve.engine.smoothquant import Smoother, smoothing_scales


def _fp32_model(folder: Path) -> tuple[LlamaModel, dict[str, torch.Tensor]]:
    config = AutoConfig.from_pretrained(folder)
    weights, _ = read_weights(safetensors_files(folder))
    model = LlamaModel(config, dict(weights), dtype=torch.float32, device=torch.device("cpu"))
    return model, weights


def test_smoothing_an_outlier_channel_cuts_the_int8_error() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g)
    x[:, 3] *= 80.0  # one channel far larger than the rest, as in LLM activations
    w = torch.randn(48, 64, generator=g) / 8
    ref = x @ w.T

    def error(xq: torch.Tensor, wq: torch.Tensor) -> float:
        return float((DynamicInt8Linear(wq, None)(xq) - ref).norm() / ref.norm())

    s = smoothing_scales(x.abs().amax(dim=0), w.abs().amax(dim=0))
    plain, smoothed = error(x, w), error(x / s, w * s)
    assert smoothed < plain / 2, (plain, smoothed)


@pytest.mark.parametrize("attention_bias", [False, True])
def test_a_smoothed_layer_computes_what_the_original_does(attention_bias: bool, tmp_path: Path) -> None:
    folder = tiny_llama_dir(tmp_path / "tiny", attention_bias=attention_bias)
    model, weights = _fp32_model(folder)
    ids = [[5, 17, 42, 8, 99, 3, 61, 7], [11, 2, 19, 33, 4, 70, 9, 28]]
    smoother = Smoother(model, ids)
    hidden, cache, batch = smoother.hidden.clone(), smoother.cache, smoother.batch
    cos, sin = smoother.cos, smoother.sin
    for index in range(model.shape.num_layers):
        raw = read_layer(f"model.layers.{index}.", weights.pop, lambda name: weights.pop(name, None))
        assert (raw.qkv_bias is not None) is attention_bias
        smoothed = smoother.smooth(raw)
        assert not torch.allclose(smoothed.qkv, raw.qkv.float())  # the scales did something
        original = model.build_layer(raw.float(), PlainLinear)
        folded = model.build_layer(smoothed, PlainLinear)
        want = model.layer_forward(original, 0, hidden, cos, sin, batch, cache)
        got = model.layer_forward(folded, 0, hidden, cos, sin, batch, cache)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(smoother.hidden, want, rtol=1e-5, atol=1e-5)  # calibration moved on
        hidden = want


def test_int8_model_calibrates_and_tracks_fp32(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    weights, _ = read_weights(safetensors_files(tiny_model_dir))
    ids = [[5, 17, 42, 8, 99, 3, 61, 7, 12, 40]]
    int8 = LlamaModel(
        config,
        dict(weights),
        dtype=torch.float32,
        device=torch.device("cpu"),
        quantize="int8",
        calibration_ids=ids,
    )
    fp32 = LlamaModel(config, dict(weights), dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(int8.lm_head, DynamicInt8Linear)
    n = len(ids[0])
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.arange(n)[None],
        slots=torch.tensor([0]),
        is_prefill=True,
        attn_len=n,
        lengths=torch.tensor([n]),
    )
    logits = []
    for model in (fp32, int8):
        s = model.shape
        cache = SlotKVCache(s.num_layers, s.num_kv_heads, s.head_dim, model.act_dtype, model.device)
        cache.fit(1, 64, 0, 64)
        logits.append(model.forward(batch, cache, torch.arange(n)))
    rel = float((logits[1] - logits[0]).norm() / logits[0].norm())
    assert rel < 0.1, rel
