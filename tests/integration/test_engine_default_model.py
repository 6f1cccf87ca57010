"""The engine on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from twinserve.config import EngineConfig
from twinserve.engine.async_engine import AsyncEngine
from twinserve.engine.chat import chat_request
from twinserve.engine.factory import build_engine
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
    engine = AsyncEngine(build_engine(EngineConfig(model=str(default_model_path), dtype="float32")))
    engine.start()
    yield engine
    engine.shutdown()


def test_chat_prompt_yields_sensible_text(default_model_path: Path) -> None:
    engine = AsyncEngine(build_engine(EngineConfig(model=str(default_model_path))))  # auto dtype
    engine.start()
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
