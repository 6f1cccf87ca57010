"""A prompt prefix shared by a prefill group is computed once and copied, with identical results."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.factories import engine_config
from tests.unit.engine.test_engine import run, token_ids
from twinserve.engine.engine import Engine
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.engine.runner import MIN_SHARED_PREFIX, shared_prefix_len

SYSTEM = list(range(30, 70))  # a 40-token "system prompt" every request starts with
SUFFIXES = [[101, 102, 103], [104, 105], [106, 107, 108, 109, 110], [111], [112, 113, 114, 115], [116, 117]]


class _Row:
    def __init__(self, ids: list[int], logprobs: bool = False) -> None:
        self.prompt_ids = ids
        self.prompt_len = len(ids)
        self.wants_prompt_logprobs = logprobs


def test_shared_prefix_len_rules() -> None:
    rows = [_Row(SYSTEM + s) for s in SUFFIXES]
    assert shared_prefix_len(rows) == len(SYSTEM)  # type: ignore[arg-type]
    # every row keeps at least its last token
    assert shared_prefix_len([_Row(SYSTEM), _Row(SYSTEM), _Row(SYSTEM + [1])]) == len(SYSTEM) - 1  # type: ignore[list-item]
    assert shared_prefix_len([_Row(SYSTEM + [1])]) == 0  # type: ignore[list-item]
    assert shared_prefix_len([_Row(SYSTEM + [1]), _Row(SYSTEM + [2], logprobs=True)]) == 0  # type: ignore[list-item]
    short = list(range(MIN_SHARED_PREFIX - 1))
    assert shared_prefix_len([_Row(short + [1]), _Row(short + [2]), _Row(short + [3])]) == 0  # type: ignore[list-item]
    # saving too little to pay for the extra pass: 10 shared tokens × 1 other row
    assert shared_prefix_len([_Row(list(range(10)) + [1]), _Row(list(range(10)) + [2])]) == 0  # type: ignore[list-item]


def _hf_greedy(model_dir: Path, ids: list[int], max_new: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
    return out[0, len(ids) :].tolist()


def _request(ids: list[int], rid: str, **params: object) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=ids, params=SamplingParams(max_new_tokens=12, **params), request_id=rid
    )


def test_a_group_sharing_a_system_prompt_generates_what_transformers_does(tiny_model_dir: Path) -> None:
    engine: Engine = build_engine(engine_config(tiny_model_dir))
    engine.eos_token_ids = frozenset()
    prefills: list[int] = []
    runner = engine.runner
    real = runner._prefill_prefix  # type: ignore[attr-defined]

    def spy(rows, prefix):  # type: ignore[no-untyped-def]
        prefills.append(prefix)
        return real(rows, prefix)

    runner._prefill_prefix = spy  # type: ignore[attr-defined]
    prompts = [SYSTEM + s for s in SUFFIXES]
    events = run(engine, [_request(p, f"r{i}") for i, p in enumerate(prompts)])
    assert prefills == [len(SYSTEM)]  # the group took the shared path once
    for i, p in enumerate(prompts):
        assert token_ids(events[f"r{i}"]) == _hf_greedy(tiny_model_dir, p, 12), i


def test_prompt_logprobs_in_the_group_turn_sharing_off_and_stay_right(tiny_model_dir: Path) -> None:
    engine: Engine = build_engine(engine_config(tiny_model_dir))
    prompts = [SYSTEM + s for s in SUFFIXES]
    requests = [
        _request(p, f"r{i}", details=True, decoder_input_details=(i == 0)) for i, p in enumerate(prompts)
    ]
    events = run(engine, requests)
    alone = run(engine, [_request(prompts[0], "solo", details=True, decoder_input_details=True)])
    grouped_prefill = events["r0"][-1].details.prefill  # type: ignore[union-attr]
    solo_prefill = alone["solo"][-1].details.prefill  # type: ignore[union-attr]
    assert [t.id for t in grouped_prefill] == prompts[0]
    for a, b in zip(grouped_prefill[1:], solo_prefill[1:], strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4  # type: ignore[operator]
