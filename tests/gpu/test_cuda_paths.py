"""CUDA paths: bitsandbytes on GPU, flash attention, bf16 on the device. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.factories import engine_config, tiny_llama_dir
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-gpu"))


def _greedy(engine, prompt: str = "the quick brown fox", n: int = 12) -> list[int]:
    state = engine.add_request(
        GenerateRequest(prompt=prompt, params=SamplingParams(max_new_tokens=n, ignore_eos=True))
    )
    while engine.has_work():
        engine.step()
    return state.output_ids


def test_cuda_fp32_matches_cpu_fp32(model_dir: Path) -> None:
    cpu = _greedy(build_engine(engine_config(model_dir, device="cpu", dtype="float32")))
    gpu = _greedy(build_engine(engine_config(model_dir, device="cuda", dtype="float32", attention="sdpa")))
    assert gpu == cpu


@pytest.mark.parametrize("quantize", ["bitsandbytes", "bitsandbytes-nf4"])
def test_bitsandbytes_on_cuda(model_dir: Path, quantize: str) -> None:
    # bitsandbytes is in the [dev] extra: a missing one fails here (the gpu marker skips without CUDA)
    engine = build_engine(engine_config(model_dir, device="cuda", dtype="auto", quantize=quantize))
    assert len(_greedy(engine)) == 12


def test_flash_attention_2_prefill(model_dir: Path) -> None:
    pytest.importorskip("flash_attn")
    sdpa = _greedy(
        build_engine(engine_config(model_dir, device="cuda", dtype="bfloat16", attention="sdpa")), n=4
    )
    flash = _greedy(
        build_engine(
            engine_config(model_dir, device="cuda", dtype="bfloat16", attention="flash_attention_2")
        ),
        n=4,
    )
    assert flash[0] == sdpa[0]


def test_batched_decode_on_cuda(model_dir: Path) -> None:
    engine = build_engine(engine_config(model_dir, device="cuda", dtype="float32"))
    solo = _greedy(engine, "hello world")
    states = [
        engine.add_request(
            GenerateRequest(prompt=p, params=SamplingParams(max_new_tokens=12, ignore_eos=True))
        )
        for p in ["hello world", "once upon a time", "to be or not"]
    ]
    while engine.has_work():
        engine.step()
    assert states[0].output_ids == solo
    assert torch.cuda.is_available()
