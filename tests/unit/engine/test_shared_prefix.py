"""A prompt prefix shared by a prefill group is computed once and copied, with identical results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine_driver import run, token_ids
from tests.factories import engine_config
from twinserve.engine.engine import Engine
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.engine.runner import MIN_SHARED_PREFIX, RunnerOutput, shared_prefix_len
from twinserve.engine.state import RequestState

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


PROMPTS = [SYSTEM + s for s in SUFFIXES]


@pytest.fixture(scope="module")
def hf_tokens(tiny_model_dir: Path) -> list[list[int]]:
    """transformers' greedy 12 tokens for each of PROMPTS (one model load for the module)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    out = []
    for ids in PROMPTS:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        out.append(gen[0, len(ids) :].tolist())
    return out


def _request(ids: list[int], rid: str, **params: object) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=ids, params=SamplingParams(max_new_tokens=12, **params), request_id=rid
    )


class PrefillSpy:
    """Records, on the engine's real runner, each prefill pass (its rows) and each shared-prefix pass."""

    def __init__(self, engine: Engine) -> None:
        runner = engine.runner
        self.passes: list[list[str]] = []
        self.shared: list[int] = []  # prefix length of each shared-prefix pass
        real_execute = runner.execute
        real_prefix = runner._prefill_prefix  # type: ignore[attr-defined]

        def execute(rows: list[RequestState], *, prefill: bool) -> RunnerOutput:
            if prefill:
                self.passes.append([r.request_id for r in rows])
            return real_execute(rows, prefill=prefill)

        def prefill_prefix(rows: list[RequestState], prefix: int) -> None:
            self.shared.append(prefix)
            real_prefix(rows, prefix)

        runner.execute = execute  # type: ignore[method-assign]
        runner._prefill_prefix = prefill_prefix  # type: ignore[attr-defined]


def test_a_group_sharing_a_system_prompt_generates_what_transformers_does(
    tiny_model_dir: Path, hf_tokens: list[list[int]]
) -> None:
    engine: Engine = build_engine(engine_config(tiny_model_dir))
    engine.eos_token_ids = frozenset()
    spy = PrefillSpy(engine)
    events = run(engine, [_request(p, f"r{i}") for i, p in enumerate(PROMPTS)])
    assert spy.passes == [[f"r{i}" for i in range(len(PROMPTS))]]  # one prefill group
    assert spy.shared == [len(SYSTEM)]  # the group took the shared path once
    for i in range(len(PROMPTS)):
        assert token_ids(events[f"r{i}"]) == hf_tokens[i], i


def test_sharing_turned_off_in_the_config_computes_every_prefix_the_same(
    tiny_model_dir: Path, hf_tokens: list[list[int]]
) -> None:
    engine: Engine = build_engine(engine_config(tiny_model_dir, share_prompt_prefix=False))
    engine.eos_token_ids = frozenset()
    spy = PrefillSpy(engine)
    events = run(engine, [_request(p, f"r{i}") for i, p in enumerate(PROMPTS)])
    # the same one prefill group as with sharing on (test above), but no shared-prefix pass
    assert spy.passes == [[f"r{i}" for i in range(len(PROMPTS))]]
    assert spy.shared == []
    for i in range(len(PROMPTS)):
        assert token_ids(events[f"r{i}"]) == hf_tokens[i], i


def test_prompt_logprobs_in_the_group_turn_sharing_off_and_stay_right(tiny_model_dir: Path) -> None:
    engine: Engine = build_engine(engine_config(tiny_model_dir))
    spy = PrefillSpy(engine)
    prompts = PROMPTS
    requests = [
        _request(p, f"r{i}", details=True, decoder_input_details=(i == 0)) for i, p in enumerate(prompts)
    ]
    events = run(engine, requests)
    # one group that would have shared its 40-token prefix, but a row wants every prompt logit
    assert spy.passes == [[f"r{i}" for i in range(len(prompts))]]
    assert spy.shared == []
    alone = run(engine, [_request(prompts[0], "solo", details=True, decoder_input_details=True)])
    grouped_prefill = events["r0"][-1].details.prefill  # type: ignore[union-attr]
    solo_prefill = alone["solo"][-1].details.prefill  # type: ignore[union-attr]
    assert [t.id for t in grouped_prefill] == prompts[0]
    for a, b in zip(grouped_prefill[1:], solo_prefill[1:], strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4  # type: ignore[operator]
