"""The engine on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from twinserve.config import EngineConfig
from twinserve.engine.async_engine import AsyncEngine
from twinserve.engine.chat import chat_request
from twinserve.engine.request import FinishReason, GenerateRequest, SamplingParams

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 + 2?",
    "Write one sentence about the sea.",
    "What language is spoken in Brazil?",
    "Give me a synonym of happy.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
]


def _run_all(engine: AsyncEngine, requests: list[GenerateRequest]) -> list[str]:
    async def main() -> list[str]:
        finals = await asyncio.gather(*[engine.generate_text(r) for r in requests])
        return [f.generated_text or "" for f in finals]

    return asyncio.run(main())


@pytest.fixture(scope="module")
def fp32_engine(default_model_path: Path):
    engine = AsyncEngine.launch(EngineConfig(model=str(default_model_path), dtype="float32"))
    yield engine
    engine.shutdown()


def test_chat_prompt_yields_sensible_text(default_model_path: Path) -> None:
    engine = AsyncEngine.launch(EngineConfig(model=str(default_model_path)))  # auto dtype
    try:
        tok = engine.engine.tokenizer
        request = chat_request(
            tok,
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(max_new_tokens=40, details=True),
        )
        final = asyncio.run(engine.generate_text(request))
    finally:
        engine.shutdown()
    assert "Paris" in (final.generated_text or "")
    assert final.finish_reason is FinishReason.EOS_TOKEN


def test_sixteen_concurrent_greedy_requests_match_their_solo_runs(fp32_engine: AsyncEngine) -> None:
    tok = fp32_engine.engine.tokenizer
    params = SamplingParams(max_new_tokens=48)

    def requests() -> list[GenerateRequest]:
        return [chat_request(tok, [{"role": "user", "content": q}], params) for q in QUESTIONS * 2]

    solo = [_run_all(fp32_engine, [r])[0] for r in requests()[: len(QUESTIONS)]] * 2
    together = _run_all(fp32_engine, requests())
    assert together == solo
    assert all(text.strip() for text in together)


def test_greedy_matches_transformers_in_fp32(fp32_engine: AsyncEngine, default_model_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tok = fp32_engine.engine.tokenizer
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    for q in QUESTIONS[:3]:
        request = chat_request(tok, [{"role": "user", "content": q}], SamplingParams(max_new_tokens=32))
        ids = tok(request.prompt, return_tensors="pt", add_special_tokens=False).input_ids
        expected = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
        final = asyncio.run(fp32_engine.generate_text(request))
        assert final.details is not None
        assert [t.id for t in final.details.tokens] == expected


def test_int8_and_int4_keep_most_greedy_choices_of_fp32(default_model_path: Path) -> None:
    """Teacher-forced next-token choices over chat turns: int8 (with and without SmoothQuant) and int4 vs fp32.

    Measured 2026-11-22: smoothed 84% same top-1, KL 0.10; unsmoothed 51%, KL 1.04.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from twinserve.engine.kv_cache import SlotKVCache
    from twinserve.engine.loader import read_weights, safetensors_files
    from twinserve.engine.models.llama import ForwardBatch, LlamaModel
    from twinserve.engine.smoothquant import calibration_token_ids

    tok = AutoTokenizer.from_pretrained(default_model_path)
    config = AutoConfig.from_pretrained(default_model_path)
    weights, _ = read_weights(safetensors_files(default_model_path))
    answer = " The capital of France is Paris, a city known for art, food and the Eiffel Tower."
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False) + answer for q in QUESTIONS
    ]
    sequences = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def logits(**kwargs: object) -> list[torch.Tensor]:
        model = LlamaModel(config, dict(weights), device=torch.device("cpu"), **kwargs)  # type: ignore[arg-type]
        out = []
        for ids in sequences:
            n, s = len(ids), model.shape
            cache = SlotKVCache(s.num_layers, s.num_kv_heads, s.head_dim, model.act_dtype, model.device)
            cache.fit(1, n, 0, n)
            batch = ForwardBatch(
                input_ids=torch.tensor([ids]),
                positions=torch.arange(n)[None],
                slots=torch.tensor([0]),
                is_prefill=True,
                attn_len=n,
                lengths=torch.tensor([n]),
            )
            out.append(model.forward(batch, cache, torch.arange(n)))
        return out

    def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
        total = sum(r.shape[0] for r in ref)
        same = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got, strict=True))
        kl = sum(
            float(
                torch.nn.functional.kl_div(
                    g.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="sum"
                )
            )
            for r, g in zip(ref, got, strict=True)
        )
        return same / total, kl / total

    ref = logits(dtype=torch.float32)
    smoothed = compare(
        ref, logits(dtype=torch.float32, quantize="int8", calibration_ids=calibration_token_ids(tok))
    )
    plain = compare(ref, logits(dtype=torch.float32, quantize="int8"))
    assert smoothed[0] >= 0.75 and smoothed[1] < plain[1] / 3, (smoothed, plain)
    # int4 is weight-only: bf16 activations, the LM head in int8. The default model's layers
    # are dequantized Q4_1 and int4 finds their grid again (measured 93%, KL 0.019)
    int4 = compare(ref, logits(dtype=torch.bfloat16, quantize="int4"))
    assert int4[0] >= 0.88 and int4[1] < smoothed[1], (int4, smoothed)
