"""Scheduling with a fake runner: no model, just the bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.factories import engine_config, tiny_tokenizer
from twinserve.engine.engine import MAX_CONSECUTIVE_FAILURES, Engine
from twinserve.engine.request import FinishReason, GenerateRequest, SamplingParams, TokenEvent
from twinserve.engine.runner import RunnerOutput
from twinserve.engine.scheduler import SlotMove
from twinserve.engine.state import RequestState
from twinserve.errors import EngineDeadError, ModelError, OverloadedError

TOKEN = 42  # a plain (non-special, non-eos) token the fake model always "generates"


@dataclass
class FakeRunner:
    """Records what the engine asked for; fails on demand."""

    calls: list[tuple[bool, list[str], list[int]]] = field(default_factory=list)
    moves: list[SlotMove] = field(default_factory=list)
    cache: tuple[int, int] = (0, 0)
    fail_next: int = 0

    def prepare_cache(self, slots: int, capacity: int, live_slots: int) -> None:
        self.cache = (slots, capacity)

    def move_slot(self, move: SlotMove) -> None:
        self.moves.append(move)

    def release_cache(self) -> None:
        self.cache = (0, 0)

    def execute(self, rows: list[RequestState], *, prefill: bool) -> RunnerOutput:
        self.calls.append((prefill, [r.request_id for r in rows], [r.slot for r in rows]))
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("boom")
        n = len(rows)
        return RunnerOutput([TOKEN] * n, [-0.5] * n, [[] for _ in rows], [None] * n)


def make_engine(tmp_path, **limits: object) -> tuple[Engine, FakeRunner]:
    tok = tiny_tokenizer()
    runner = FakeRunner()
    cfg = engine_config(tmp_path, **limits)
    return Engine(cfg, runner, tok, frozenset({tok.eos_token_id})), runner


def req(rid: str, n_prompt: int = 4, max_new: int = 3) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=[10 + i for i in range(n_prompt)],
        params=SamplingParams(max_new_tokens=max_new),
        request_id=rid,
    )


def run_to_end(engine: Engine, limit: int = 100) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    for _ in range(limit):
        if not engine.has_work():
            break
        events += engine.step()
    return events


def test_requests_join_between_steps_and_leave_when_done(tmp_path) -> None:
    engine, runner = make_engine(tmp_path)
    engine.add_request(req("a", max_new=2))
    engine.add_request(req("b", max_new=4))
    engine.step()  # prefill a, b
    assert runner.calls[-1] == (True, ["a", "b"], [0, 1])
    engine.add_request(req("c", max_new=2))
    events = engine.step()  # prefill c, then decode a, b in the same step
    assert runner.calls[-2] == (True, ["c"], [2])
    assert runner.calls[-1] == (False, ["a", "b"], [0, 1])
    finished = {e.request_id for e in events if e.finished}
    assert finished == {"a"}  # a leaves the moment its 2nd token is out
    # c (prefilled at slot 2: its 4 prompt positions) moved into a's slot 0
    assert runner.moves == [SlotMove(src=2, dst=0, length=4)]
    events = engine.step()
    assert runner.calls[-1] == (False, ["c", "b"], [0, 1])
    assert {e.request_id for e in events if e.finished} == {"c"}
    # b (4 prompt + 2 generated positions cached) moved into c's slot
    assert runner.moves[-1] == SlotMove(src=1, dst=0, length=6)
    run_to_end(engine)
    assert engine.num_in_flight == 0 and runner.cache == (0, 0)


def test_every_request_gets_exactly_max_new_tokens(tmp_path) -> None:
    engine, _ = make_engine(tmp_path)
    for i, n in enumerate([1, 5, 3, 8]):
        engine.add_request(req(f"r{i}", max_new=n))
    events = run_to_end(engine)
    final = {e.request_id: e for e in events if e.finished}
    for i, n in enumerate([1, 5, 3, 8]):
        assert final[f"r{i}"].details is not None
        assert final[f"r{i}"].details.generated_tokens == n
        assert final[f"r{i}"].finish_reason is FinishReason.LENGTH


def test_prefill_budget_splits_newcomers_over_steps(tmp_path) -> None:
    engine, runner = make_engine(tmp_path, max_input_tokens=8, max_batch_prefill_tokens=16)
    for i in range(5):
        engine.add_request(req(f"r{i}", n_prompt=8, max_new=10))
    engine.step()
    assert runner.calls[-1] == (True, ["r0", "r1"], [0, 1])
    engine.step()
    # the next newcomers are prefilled, then the running streams decode in the same step
    assert runner.calls[-2] == (True, ["r2", "r3"], [2, 3])
    assert runner.calls[-1] == (False, ["r0", "r1"], [0, 1])


def test_prefill_step_target_splits_a_burst_but_lets_a_long_prompt_through(tmp_path) -> None:
    engine, runner = make_engine(
        tmp_path, max_input_tokens=64, max_batch_prefill_tokens=256, prefill_step_tokens=24
    )
    for i in range(4):
        engine.add_request(req(f"r{i}", n_prompt=8, max_new=10))
    engine.add_request(req("long", n_prompt=40, max_new=10))
    prefills = []
    for _ in range(4):
        engine.step()
        prefills += [c[1] for c in runner.calls if c[0] and c[1] not in prefills]
    # 3 × 8 = 24 tokens per pass; the 40-token prompt is over the soft target and goes alone
    assert prefills == [["r0", "r1", "r2"], ["r3"], ["long"]]


def test_kv_budget_makes_requests_wait_not_truncate(tmp_path) -> None:
    # each request reserves 4 + 60 = 64 tokens; the budget holds two of them
    engine, runner = make_engine(
        tmp_path,
        max_input_tokens=8,
        max_total_tokens=64,
        max_batch_total_tokens=128,
        max_batch_prefill_tokens=64,
    )
    for i in range(3):
        engine.add_request(req(f"r{i}", max_new=60))
    engine.step()
    assert runner.calls[-1] == (True, ["r0", "r1"], [0, 1])
    slots, capacity = runner.cache
    assert slots * capacity <= 128
    events = run_to_end(engine, limit=500)
    final = {e.request_id: e for e in events if e.finished}
    assert all(final[f"r{i}"].details.generated_tokens == 60 for i in range(3))
    prefilled = [c[1] for c in runner.calls if c[0]]
    assert prefilled[-1] == ["r2"]


def test_full_engine_raises_overload_at_once(tmp_path) -> None:
    engine, _ = make_engine(tmp_path, max_concurrent_requests=2)
    engine.add_request(req("a"))
    engine.add_request(req("b"))
    with pytest.raises(OverloadedError):
        engine.add_request(req("c"))
    run_to_end(engine)
    engine.add_request(req("d"))  # capacity is back once they finish


def test_abort_frees_the_slot_at_the_next_step(tmp_path) -> None:
    engine, runner = make_engine(tmp_path)
    engine.add_request(req("a", max_new=50))
    engine.add_request(req("b", max_new=50))
    engine.add_request(req("w", max_new=50))
    engine.step()
    engine.abort_request("a")
    engine.step()
    assert runner.calls[-1][1] == ["w", "b"]  # w moved into a's slot 0
    assert engine.num_in_flight == 2


def test_abort_of_waiting_request(tmp_path) -> None:
    engine, runner = make_engine(tmp_path, max_batch_size=1)
    engine.add_request(req("a", max_new=5))
    engine.add_request(req("b", max_new=5))
    engine.step()
    engine.abort_request("b")
    run_to_end(engine)
    assert all("b" not in ids for _, ids, _ in runner.calls)
    assert engine.num_in_flight == 0


def test_failed_forward_fails_its_rows_and_engine_keeps_serving(tmp_path) -> None:
    engine, runner = make_engine(tmp_path)
    engine.add_request(req("a"))
    runner.fail_next = 1
    events = engine.step()
    assert events and isinstance(events[0].error, ModelError)
    assert engine.num_in_flight == 1  # only the probe that tells a bad request from a bad device
    engine.add_request(req("b", max_new=2))
    final = [e for e in run_to_end(engine) if e.finished]
    assert final[0].error is None and final[0].details.generated_tokens == 2


def test_repeated_failures_kill_the_engine(tmp_path) -> None:
    engine, runner = make_engine(tmp_path)
    runner.fail_next = 1000  # a broken device: every pass fails, the probes' too
    engine.add_request(req("r"))
    with pytest.raises(EngineDeadError):
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            engine.step()
