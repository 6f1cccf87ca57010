"""SmoothQuant for int8: smoothing leaves the full-precision model unchanged and helps int8.

"Helps" is measured where it matters: on a model whose activations have outlier channels,
smoothed int8 must beat int8 without smoothing (the plain tiny model has none, and int8
without smoothing already tracks it, so it proves nothing about smoothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tests.factories import tiny_llama_dir
from twinserve.engine import layers
from twinserve.engine.kv_cache import SlotKVCache
from twinserve.engine.layers import DynamicInt8Linear, PlainLinear
from twinserve.engine.loader import read_tensors, read_weights, safetensors_files
from twinserve.engine.models.llama import ForwardBatch, LlamaModel, read_layer, rms_norm
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


OUTLIER = 50.0  # how much larger the outlier channels are than the rest
CALIBRATION = [[5, 17, 42, 8, 99, 3, 61, 7, 12, 40, 33, 21], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
EVAL_IDS = [[100, 120, 140, 160, 180, 13, 14, 15, 16, 17]]  # not the calibration tokens


def outlier_llama_dir(path: Path, *, tie_word_embeddings: bool = False) -> Path:
    """A tiny Llama whose every linear sees one input channel OUTLIER times larger than the rest.

    Each outlier is made by scaling the op before the linear up and the linear's matching weight
    column down by the same factor, so the fp32 model computes what the plain tiny model does;
    only the activations' shape changes, as in real LLMs (where a few channels dominate).
    """
    folder = tiny_llama_dir(path, tie_word_embeddings=tie_word_embeddings)
    file = folder / "model.safetensors"
    w = load_file(file)
    head_dim, group = 16, 2  # tiny_llama_dir: 4 query heads over 2 KV heads
    channel, inner, v_channel = 3, 7, 5  # hidden channel; MLP channel; channel of KV head 0's V
    for i in range(2):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"][channel] *= OUTLIER  # qkv input
        for n in "qkv":
            w[p + f"self_attn.{n}_proj.weight"][:, channel] /= OUTLIER
        w[p + "post_attention_layernorm.weight"][channel] *= OUTLIER  # gate_up input
        for n in ("gate", "up"):
            w[p + f"mlp.{n}_proj.weight"][:, channel] /= OUTLIER
        w[p + "mlp.up_proj.weight"][inner] *= OUTLIER  # down_proj input
        w[p + "mlp.down_proj.weight"][:, inner] /= OUTLIER
        w[p + "self_attn.v_proj.weight"][v_channel] *= OUTLIER  # o_proj input, query heads 0 and 1
        for q_head in range(group):
            w[p + "self_attn.o_proj.weight"][:, q_head * head_dim + v_channel] /= OUTLIER
    if not tie_word_embeddings:  # LM head input (a tied head is the embedding: left alone)
        w["model.norm.weight"][channel] *= OUTLIER
        w["lm_head.weight"][:, channel] /= OUTLIER
    save_file(w, file, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return outlier_llama_dir(tmp_path_factory.mktemp("outlier-llama") / "m")


def _model(folder: Path, **kwargs: object) -> LlamaModel:
    config = AutoConfig.from_pretrained(folder)
    weights = read_tensors(safetensors_files(folder))
    return LlamaModel(config, weights, dtype=torch.float32, device=torch.device("cpu"), **kwargs)


def _logits(model: LlamaModel, ids: list[list[int]]) -> torch.Tensor:
    """fp32 logits at every position of one prompt."""
    n = len(ids[0])
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.arange(n)[None],
        slots=torch.tensor([0]),
        is_prefill=True,
        attn_len=n,
        lengths=torch.tensor([n]),
    )
    s = model.shape
    cache = SlotKVCache(s.num_layers, s.num_kv_heads, s.head_dim, model.act_dtype, model.device)
    cache.fit(1, 64, 0, 64)
    return model.forward(batch, cache, torch.arange(n))


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_the_outlier_model_is_the_tiny_model_in_fp32(outlier_model_dir: Path, tiny_model_dir: Path) -> None:
    # what int8 gets wrong below is the outliers' doing, not a different model
    want = _logits(_model(tiny_model_dir), EVAL_IDS)
    torch.testing.assert_close(_logits(_model(outlier_model_dir), EVAL_IDS), want, rtol=1e-4, atol=1e-4)


def test_int8_with_smoothing_beats_int8_without_on_outlier_activations(outlier_model_dir: Path) -> None:
    fp32 = _logits(_model(outlier_model_dir), EVAL_IDS)
    plain = _model(outlier_model_dir, quantize="int8")  # no calibration tokens: no smoothing
    smoothed = _model(outlier_model_dir, quantize="int8", calibration_ids=CALIBRATION)
    assert isinstance(smoothed.lm_head, DynamicInt8Linear) and isinstance(plain.lm_head, DynamicInt8Linear)
    plain_error = _rel_error(_logits(plain, EVAL_IDS), fp32)
    smoothed_error = _rel_error(_logits(smoothed, EVAL_IDS), fp32)
    assert plain_error > 0.3, plain_error  # the outliers really break per-tensor activation scales
    assert smoothed_error < plain_error / 4, (plain_error, smoothed_error)
    assert smoothed_error < 0.15, smoothed_error  # and smoothed int8 tracks fp32
    same_top1 = (_logits(smoothed, EVAL_IDS).argmax(-1) == fp32.argmax(-1)).float().mean()
    assert same_top1 >= 0.9, same_top1


class _FullPrecisionInt8(PlainLinear):
    """Stands in for DynamicInt8Linear: the int8 load path (smoothing and all) without rounding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.float(), None if bias is None else bias.float())


@pytest.mark.parametrize("tied", [False, True])
def test_smoothing_folds_are_exact_before_quantization(
    tied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fold (norms, up/v rows, the final norm into the LM head) leaves the fp32 logits as
    they were; a tied head's fold must not touch the embedding the input lookup uses."""
    folder = outlier_llama_dir(tmp_path / "m", tie_word_embeddings=tied)
    want = _logits(_model(folder), EVAL_IDS)
    raw = read_tensors(safetensors_files(folder))
    embed = raw["model.embed_tokens.weight"]
    monkeypatch.setattr(layers, "DynamicInt8Linear", _FullPrecisionInt8)
    folded = _model(folder, quantize="int8", calibration_ids=CALIBRATION)
    assert isinstance(folded.lm_head, _FullPrecisionInt8)
    head = embed if tied else raw["lm_head.weight"]
    assert not torch.allclose(folded.lm_head.weight, head)  # the head's scales did something
    torch.testing.assert_close(folded.embed, embed, rtol=0, atol=0)
    torch.testing.assert_close(_logits(folded, EVAL_IDS), want, rtol=1e-5, atol=1e-5)


def test_lm_head_fold_alone_is_exact(outlier_model_dir: Path) -> None:
    """The final norm divided by s and the head's columns times s give the same fp32 logits."""
    model = _model(outlier_model_dir)
    weights = read_tensors(safetensors_files(outlier_model_dir))
    smoother = Smoother(model, CALIBRATION)
    for index in range(model.shape.num_layers):
        smoother.smooth(read_layer(f"model.layers.{index}.", weights.pop, lambda n: weights.pop(n, None)))
    norm, head = weights["model.norm.weight"], weights["lm_head.weight"]
    folded_norm, folded_head = smoother.smooth_head(norm, head)
    assert not torch.allclose(folded_head, head) and not torch.allclose(folded_norm, norm)
    hidden = smoother.hidden  # the last layer's output for the calibration tokens
    eps = model.shape.rms_norm_eps
    want = PlainLinear(head, None)(rms_norm(hidden, norm, eps))
    got = PlainLinear(folded_head, None)(rms_norm(hidden, folded_norm, eps))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and that hidden state is the model's own: the head was checked on real last-layer activations
    rows, width = smoother.batch.input_ids.shape
    cache = SlotKVCache(model.shape.num_layers, 2, 16, torch.float32, model.device)
    cache.fit(rows, width, 0, rows * width)
    torch.testing.assert_close(model.forward(smoother.batch, cache, torch.arange(rows * width)), want)
