"""A forward pass that fails is retried row by row: one bad request fails alone (424), the
others go on with the tokens they would have had; only passes where every row fails count
towards the engine's death."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.engine_driver import run, token_ids
from tests.factories import engine_config
from tests.faults import POISON, FaultyRunner
from twinserve.engine.engine import GENERATION_FAILED, MAX_CONSECUTIVE_FAILURES, Engine
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.errors import EngineDeadError, ModelError

PROMPTS = ["the quick brown fox", "hello world, hello there", "once upon a time there was"]


def requests(prefix: str, *, poison_at: int | None = None) -> list[GenerateRequest]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        rid = f"{POISON}-{i}" if i == poison_at else f"{prefix}{i}"
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        out.append(GenerateRequest(prompt=prompt, params=params, request_id=rid))
    return out


@pytest.fixture()
def engine(tiny_model_dir: Path) -> Engine:
    return build_engine(engine_config(tiny_model_dir))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_one_failing_row_fails_alone_and_the_batch_keeps_its_tokens(
    engine: Engine, phase: str, caplog: pytest.LogCaptureFixture
) -> None:
    clean = run(engine, requests("clean"))
    faulty = FaultyRunner(engine.runner, phase=phase)
    engine.runner = faulty
    with caplog.at_level(logging.ERROR):
        events = run(engine, requests("r", poison_at=1))
    poisoned = events["poison-1"][-1]
    assert isinstance(poisoned.error, ModelError) and poisoned.error.message == GENERATION_FAILED
    assert poisoned.error.status_code == 424
    for i in (0, 2):  # the rest of the batch: same greedy tokens as in the clean run
        assert token_ids(events[f"r{i}"]) == token_ids(clean[f"clean{i}"])
        assert events[f"r{i}"][-1].error is None and events[f"r{i}"][-1].finished
    assert 1 in faulty.passes  # the batch was retried one row at a time
    assert engine.has_work() is False and engine.num_admitted == 0
    assert "injected" in caplog.text  # the cause is in the log, not in what the client sees


def test_a_broken_device_kills_the_engine_within_a_few_passes(engine: Engine) -> None:
    faulty = FaultyRunner(engine.runner, always=True)
    engine.runner = faulty
    engine.add_request(
        GenerateRequest(prompt="hello", params=SamplingParams(max_new_tokens=4), request_id="r")
    )
    events = []
    with pytest.raises(EngineDeadError):
        for _ in range(10):
            events += engine.step()
    assert isinstance(events[0].error, ModelError) and events[0].request_id == "r"
    # the probes queued after each failure failed too: that is what tells a device from a request
    assert faulty.failed_passes == MAX_CONSECUTIVE_FAILURES


@pytest.mark.parametrize("with_good_traffic", [True, False])
def test_bad_requests_again_and_again_do_not_kill_the_engine(engine: Engine, with_good_traffic: bool) -> None:
    engine.runner = FaultyRunner(engine.runner, phase="prefill")
    for round_ in range(3 * MAX_CONSECUTIVE_FAILURES):
        batch = [
            GenerateRequest(
                prompt=f"{POISON} hello", params=SamplingParams(max_new_tokens=2), request_id=f"bad{round_}"
            )
        ]
        if with_good_traffic:
            batch.append(
                GenerateRequest(
                    prompt="hello", params=SamplingParams(max_new_tokens=2), request_id=f"ok{round_}"
                )
            )
        events = run(engine, batch)  # an engine that died would raise here
        assert isinstance(events[f"bad{round_}"][-1].error, ModelError)
        if with_good_traffic:
            assert events[f"ok{round_}"][-1].error is None
