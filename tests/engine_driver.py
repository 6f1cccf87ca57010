"""Drive an `Engine` step by step in tests, and the transformers reference it is compared with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from twinserve.engine.engine import Engine
from twinserve.engine.kv_cache import SlotKVCache
from twinserve.engine.models.architecture import ModelShape, rope_parameters
from twinserve.engine.models.llama import ForwardBatch, LlamaModel, _rope_parameters
from twinserve.engine.request import GenerateRequest, SamplingParams, TokenEvent


def built_from(config: object) -> tuple[ModelShape, dict[str, object], list[float], float, object]:
    """What the engine builds its forward pass from: shape, RoPE settings, frequencies, scaling, EOS."""
    shape = ModelShape.from_config(config)
    inv_freq, scaling = _rope_parameters(config, torch.device("cpu"))
    return shape, rope_parameters(config), inv_freq.tolist(), scaling, getattr(config, "eos_token_id", None)


def run(engine: Engine, requests: list[GenerateRequest], join_every: int = 0) -> dict[str, list[TokenEvent]]:
    """Feed requests (all at once, or one more every `join_every` steps) and collect events."""
    events: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
    pending = list(requests)
    step = 0
    while pending or engine.has_work():
        if pending and (join_every == 0 or step % join_every == 0):
            batch = pending if join_every == 0 else pending[:1]
            for r in batch:
                engine.add_request(r)
            pending = pending[len(batch) :]
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
        step += 1
    return events


def token_ids(events: list[TokenEvent]) -> list[int]:
    return [e.token.id for e in events if e.token is not None]


def greedy(prompt: str, rid: str, max_new: int = 24) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=SamplingParams(max_new_tokens=max_new), request_id=rid)


def hf_greedy(model_dir: Path, prompt: str, max_new: int, dtype: torch.dtype = torch.float32) -> list[int]:
    """transformers `generate`'s greedy tokens, exactly `max_new` of them (EOS does not stop it)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, min_new_tokens=max_new)
    return out[0, ids.shape[1] :].tolist()


def engine_logits(model: LlamaModel, ids: list[int], *, decode: bool) -> torch.Tensor:
    """The engine's fp32 logits after each token of `ids`, teacher-forced.

    decode=False: one prefill pass over the whole text; decode=True: the first token
    prefilled, then one decode step per token, each reading the KV cache like serving does.
    """
    s = model.shape
    cache = SlotKVCache(s.num_layers, s.num_kv_heads, s.head_dim, model.act_dtype, model.device)
    cache.fit(1, len(ids), 0, len(ids))
    slot = torch.tensor([0])

    def prefill(tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        batch = ForwardBatch(
            input_ids=torch.tensor([tokens]),
            positions=torch.arange(n)[None],
            slots=slot,
            is_prefill=True,
            attn_len=n,
            lengths=torch.tensor([n]),
        )
        return model.forward(batch, cache, torch.arange(n))

    if not decode:
        return prefill(ids)
    out = [prefill(ids[:1])]
    for pos in range(1, len(ids)):
        step = ForwardBatch(
            input_ids=torch.tensor([ids[pos]]),
            positions=torch.tensor([pos]),
            slots=slot,
            is_prefill=False,
            attn_len=pos + 1,
            first_slot=0,
        )
        out.append(model.forward(step, cache))
    return torch.cat(out)


def hf_logits(model: torch.nn.Module, ids: list[int], *, decode: bool) -> torch.Tensor:
    """transformers' fp32 logits after each token of `ids`: one pass, or token by token with its cache."""
    with torch.no_grad():
        if not decode:
            return model(torch.tensor([ids])).logits[0].float()  # type: ignore[no-any-return]
        cache = DynamicCache(config=model.config)
        steps = [model(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1].float() for t in ids]
        return torch.stack(steps)


@dataclass(frozen=True)
class Agreement:
    """Next-token choices of the engine against a reference, over the same positions."""

    top1: float  # the engine's argmax is a top-1 token of the reference (exact ties included)
    strict_top1: float  # the same argmax index
    kl_mean: float  # mean KL(reference || engine) per position
    parted_gaps: list[float]  # the reference's top-2 gap where the engine chose another token
    parted_gap_ulps: list[float]  # the same gaps in bf16 units in the last place of the top logit

    def __str__(self) -> str:
        return (
            f"top-1 {self.top1:.2%} (strict {self.strict_top1:.2%}), KL {self.kl_mean:.2e}, "
            f"gaps where they part {self.parted_gaps[:8]} (bf16 ulps {self.parted_gap_ulps[:8]})"
        )


def agreement(engine: torch.Tensor, reference: torch.Tensor) -> Agreement:
    chosen = engine.argmax(-1)
    best = reference.max(-1).values
    tied_top = reference.gather(-1, chosen[:, None]).squeeze(-1) == best
    strict = chosen == reference.argmax(-1)
    kl = F.kl_div(engine.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none").sum(
        -1
    )
    top2 = reference.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1])[~strict]
    tops = top2[:, 0][~strict]
    return Agreement(
        top1=float(tied_top.float().mean()),
        strict_top1=float(strict.float().mean()),
        kl_mean=float(kl.mean()),
        parted_gaps=[round(float(g), 5) for g in gaps],
        parted_gap_ulps=[round(float(g) / bf16_ulp(float(t)), 2) for g, t in zip(gaps, tops, strict=True)],
    )


def bf16_ulp(value: float) -> float:
    """The spacing of bfloat16 numbers at `value` (8 significant bits)."""
    return float(2.0 ** (math.floor(math.log2(max(abs(value), 2.0**-126))) - 7))
