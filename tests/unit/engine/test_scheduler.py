"""Scheduling through the real model runner of the tiny Llama, observed by a spy.

`SpyRunner` is the real `ModelRunner` (same model, same slot cache): it records what the
engine asked of it, then does it. So every slot, move and cache size asserted here is one the
real forward pass ran with, and a wrong move shows up as wrong tokens too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import engine_config
from twinserve.config import EngineConfig
from twinserve.engine.engine import MAX_CONSECUTIVE_FAILURES, Engine
from twinserve.engine.factory import build_engine
from twinserve.engine.loader import LoadedModel
from twinserve.engine.request import FinishReason, GenerateRequest, SamplingParams, TokenEvent
from twinserve.engine.runner import ModelRunner, RunnerOutput
from twinserve.engine.scheduler import SlotMove
from twinserve.engine.state import RequestState
from twinserve.errors import EngineDeadError, ModelError, OverloadedError


class SpyRunner(ModelRunner):
    """The real runner, recording each call before making it; fails `fail_next` passes on demand."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        self.calls: list[tuple[bool, list[str], list[int]]] = []
        self.moves: list[SlotMove] = []
        self.prepared: list[tuple[int, int]] = []  # (slots, capacity) asked for, per step
        self.releases = 0
        self.fail_next = 0

    def prepare_cache(self, slots: int, capacity: int, live_slots: int) -> None:
        self.prepared.append((slots, capacity))
        super().prepare_cache(slots, capacity, live_slots)

    def move_slot(self, move: SlotMove) -> None:
        self.moves.append(move)
        super().move_slot(move)

    def release_cache(self) -> None:
        self.releases += 1
        super().release_cache()

    def execute(self, rows: list[RequestState], *, prefill: bool) -> RunnerOutput:
        self.calls.append((prefill, [r.request_id for r in rows], [r.slot for r in rows]))
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("CUDA error: device-side assert triggered (injected)")
        return super().execute(rows, prefill=prefill)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model, loaded once by the real factory; each test gets its own runner and cache."""
    engine = build_engine(engine_config(tiny_model_dir), warmup=False)
    assert isinstance(engine.loaded, LoadedModel)
    return engine.loaded


def make_engine(loaded: LoadedModel, **limits: object) -> tuple[Engine, SpyRunner]:
    # prefill_step_tokens stays as given (None: the whole max_batch_prefill_tokens), unlike the
    # factory's CPU default, so the budgets below are the ones each test sets
    cfg = engine_config(loaded.model_path, **limits)
    runner = SpyRunner(loaded, cfg)
    return Engine(cfg, runner, loaded.tokenizer, loaded.eos_token_ids), runner


def req(rid: str, n_prompt: int = 4, max_new: int = 3) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=[10 + i for i in range(n_prompt)],
        params=SamplingParams(max_new_tokens=max_new, ignore_eos=True),
        request_id=rid,
    )


def run_to_end(engine: Engine, limit: int = 100) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    for _ in range(limit):
        if not engine.has_work():
            break
        events += engine.step()
    return events


def tokens_of(events: list[TokenEvent], rid: str) -> list[int]:
    return [e.token.id for e in events if e.request_id == rid and e.token is not None]


def logprobs_of(events: list[TokenEvent], rid: str) -> list[float | None]:
    """The chosen tokens' logprobs: unlike greedy ids, they move with any KV position gone wrong."""
    return [e.token.logprob for e in events if e.request_id == rid and e.token is not None]


def test_requests_join_between_steps_and_leave_when_done(loaded: LoadedModel) -> None:
    engine, runner = make_engine(loaded)
    events: list[TokenEvent] = []
    engine.add_request(req("a", max_new=2))
    engine.add_request(req("b", n_prompt=5, max_new=4))
    events += engine.step()  # prefill a, b
    assert runner.calls[-1] == (True, ["a", "b"], [0, 1])
    engine.add_request(req("c", n_prompt=6, max_new=2))
    step = engine.step()  # prefill c, then decode a, b in the same step
    events += step
    assert runner.calls[-2] == (True, ["c"], [2])
    assert runner.calls[-1] == (False, ["a", "b"], [0, 1])
    assert {e.request_id for e in step if e.finished} == {"a"}  # a leaves with its 2nd token
    # c (prefilled at slot 2: its 6 prompt positions) moved into a's slot 0
    assert runner.moves == [SlotMove(src=2, dst=0, length=6)]
    step = engine.step()
    events += step
    assert runner.calls[-1] == (False, ["c", "b"], [0, 1])
    assert {e.request_id for e in step if e.finished} == {"c"}
    # b (5 prompt + 2 generated positions cached) moved into c's slot
    assert runner.moves[-1] == SlotMove(src=1, dst=0, length=7)
    events += run_to_end(engine)
    assert engine.num_in_flight == 0 and runner.cache.slots == 0 and runner.releases >= 1
    # the moves copied every cached position: b and c compute what they compute alone
    for rid, request in (("b", req("b", n_prompt=5, max_new=4)), ("c", req("c", n_prompt=6, max_new=2))):
        alone, _ = make_engine(loaded)
        alone.add_request(request)
        solo = run_to_end(alone)
        assert tokens_of(events, rid) == tokens_of(solo, rid), rid
        assert logprobs_of(events, rid) == pytest.approx(logprobs_of(solo, rid), abs=1e-4), rid


def test_every_request_gets_exactly_max_new_tokens(loaded: LoadedModel) -> None:
    engine, _ = make_engine(loaded)
    for i, n in enumerate([1, 5, 3, 8]):
        engine.add_request(req(f"r{i}", max_new=n))
    events = run_to_end(engine)
    final = {e.request_id: e for e in events if e.finished}
    for i, n in enumerate([1, 5, 3, 8]):
        details = final[f"r{i}"].details
        assert details is not None and details.generated_tokens == n
        assert len(tokens_of(events, f"r{i}")) == n
        assert final[f"r{i}"].finish_reason is FinishReason.LENGTH


def test_prefill_budget_splits_newcomers_over_steps(loaded: LoadedModel) -> None:
    engine, runner = make_engine(loaded, max_input_tokens=8, max_batch_prefill_tokens=16)
    for i in range(5):
        engine.add_request(req(f"r{i}", n_prompt=8, max_new=10))
    engine.step()
    assert runner.calls[-1] == (True, ["r0", "r1"], [0, 1])
    engine.step()
    # the next newcomers are prefilled, then the running streams decode in the same step
    assert runner.calls[-2] == (True, ["r2", "r3"], [2, 3])
    assert runner.calls[-1] == (False, ["r0", "r1"], [0, 1])


def test_prefill_step_target_splits_a_burst_but_lets_a_long_prompt_through(loaded: LoadedModel) -> None:
    engine, runner = make_engine(
        loaded, max_input_tokens=64, max_batch_prefill_tokens=256, prefill_step_tokens=24
    )
    for i in range(4):
        engine.add_request(req(f"r{i}", n_prompt=8, max_new=10))
    engine.add_request(req("long", n_prompt=40, max_new=10))
    for _ in range(4):
        engine.step()
    prefills = [ids for prefill, ids, _ in runner.calls if prefill]
    # 3 × 8 = 24 tokens per pass; the 40-token prompt is over the soft target and goes alone
    assert prefills == [["r0", "r1", "r2"], ["r3"], ["long"]]


def test_kv_budget_makes_requests_wait_not_truncate(loaded: LoadedModel) -> None:
    # each request reserves 4 + 12 = 16 tokens; the budget holds two of them
    engine, runner = make_engine(
        loaded,
        max_input_tokens=8,
        max_total_tokens=16,
        max_batch_total_tokens=32,
        max_batch_prefill_tokens=64,
    )
    for i in range(3):
        engine.add_request(req(f"r{i}", max_new=12))
    engine.step()
    assert runner.calls[-1] == (True, ["r0", "r1"], [0, 1])
    # the real cache the pass ran on holds both rows and stays within the KV budget
    assert runner.cache.slots >= 2 and runner.cache.capacity >= 16
    assert runner.cache.slots * runner.cache.capacity <= 32
    events = run_to_end(engine, limit=500)
    final = {e.request_id: e for e in events if e.finished}
    for i in range(3):
        details = final[f"r{i}"].details
        assert details is not None and details.generated_tokens == 12
    prefilled = [ids for prefill, ids, _ in runner.calls if prefill]
    assert prefilled == [["r0", "r1"], ["r2"]]  # r2 waited for a slot, it was not cut short
    assert all(slots * capacity <= 32 for slots, capacity in runner.prepared)


def test_full_engine_raises_overload_at_once(loaded: LoadedModel) -> None:
    engine, runner = make_engine(loaded, max_concurrent_requests=2)
    engine.add_request(req("a"))
    engine.add_request(req("b"))
    with pytest.raises(OverloadedError):
        engine.add_request(req("c"))
    run_to_end(engine)
    engine.add_request(req("d"))  # capacity is back once they finish
    run_to_end(engine)
    assert all("c" not in ids for _, ids, _ in runner.calls)
    assert [ids for prefill, ids, _ in runner.calls if prefill] == [["a", "b"], ["d"]]


def test_abort_frees_the_slot_at_the_next_step(loaded: LoadedModel) -> None:
    engine, runner = make_engine(loaded)
    engine.add_request(req("a", max_new=50))
    engine.add_request(req("b", max_new=50))
    engine.add_request(req("w", max_new=50))
    engine.step()
    engine.abort_request("a")
    engine.step()
    assert runner.calls[-1][1:] == (["w", "b"], [0, 1])  # w moved into a's slot 0
    assert runner.moves == [SlotMove(src=2, dst=0, length=4)]  # its 4 prefilled positions
    assert engine.num_in_flight == 2
    engine.abort_request("w")
    engine.abort_request("b")
    run_to_end(engine)


def test_abort_of_waiting_request(loaded: LoadedModel) -> None:
    engine, runner = make_engine(loaded, max_batch_size=1)
    engine.add_request(req("a", max_new=5))
    engine.add_request(req("b", max_new=5))
    engine.step()
    engine.abort_request("b")
    run_to_end(engine)
    assert all("b" not in ids for _, ids, _ in runner.calls)
    assert engine.num_in_flight == 0


def test_failed_forward_fails_its_rows_and_engine_keeps_serving(loaded: LoadedModel) -> None:
    engine, runner = make_engine(loaded)
    engine.add_request(req("a"))
    runner.fail_next = 1
    events = engine.step()
    assert [e.request_id for e in events] == ["a"] and isinstance(events[0].error, ModelError)
    assert engine.num_in_flight == 1  # only the probe that tells a bad request from a bad device
    engine.add_request(req("b", max_new=2))
    final = [e for e in run_to_end(engine) if e.finished]
    assert {e.request_id for e in final} == {"probe-1", "b"}
    assert all(e.error is None for e in final)
    b = next(e for e in final if e.request_id == "b")
    assert b.details is not None and b.details.generated_tokens == 2


def test_repeated_failures_kill_the_engine(loaded: LoadedModel) -> None:
    engine, runner = make_engine(loaded)
    runner.fail_next = 1000  # a broken device: every pass fails, the probes' too
    engine.add_request(req("r"))
    with pytest.raises(EngineDeadError):
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            engine.step()
    assert [ids for _, ids, _ in runner.calls] == [["r"], ["probe-1"], ["probe-2"]]
