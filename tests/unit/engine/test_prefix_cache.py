"""The cross-request prefix cache on the tiny model (fp32): a later prompt that starts like an
earlier one reuses its KV and prefills only the rest, with greedy output token for token the
same as without the cache; partial hits, entries giving way to running requests, one entry
shared by concurrent requests, aborts, and the switch that turns it off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine_driver import greedy, run, token_ids
from tests.factories import engine_config
from twinserve.engine.engine import Engine
from twinserve.engine.factory import build_engine
from twinserve.engine.kv_cache import SlotKVCache
from twinserve.engine.models.llama import ForwardBatch
from twinserve.engine.prefix_cache import BLOCK, MIN_HIT_TOKENS, PrefixCache, block_hashes
from twinserve.engine.request import GenerateRequest, SamplingParams, TokenEvent

CONTEXT = "the quick brown fox jumps over the lazy dog and runs far away " * 3


def engine(model: Path, **overrides: Any) -> Engine:
    return build_engine(engine_config(model, **overrides), warmup=False)


class PrefillSpy:
    """Records, for every prefill pass of the real model, its rows and their first position;
    a pass continuing cached prefixes of different lengths (`ragged`) records each row's."""

    def __init__(self, eng: Engine) -> None:
        self.passes: list[tuple[int, int, int]] = []  # (rows, tokens per row, first position)
        self.ragged: list[list[int]] = []  # first position of each row
        self.capacity = 0  # the slot cache's positions per row, largest seen
        model = eng.runner.model  # type: ignore[attr-defined]
        real = model.forward

        def forward(batch: ForwardBatch, cache: SlotKVCache, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.capacity = max(self.capacity, cache.capacity)
            if batch.is_prefill:
                rows, width = batch.input_ids.shape
                self.passes.append((rows, width, int(batch.positions[0, 0])))
            elif batch.is_verify:  # speculation is off in these tests: a ragged prefill
                self.ragged.append(batch.positions[:, 0].tolist())
            return real(batch, cache, *args, **kwargs)

        model.forward = forward


def final(events: list[TokenEvent]) -> TokenEvent:
    return next(e for e in events if e.finished)


def one(eng: Engine, prompt: str, rid: str, max_new: int = 12) -> list[TokenEvent]:
    return run(eng, [greedy(prompt, rid, max_new)])[rid]


def test_a_later_prompt_prefills_only_what_the_cache_lacks(tiny_model_dir: Path) -> None:
    eng = engine(tiny_model_dir)
    spy = PrefillSpy(eng)
    first = one(eng, CONTEXT + "first question?", "a")
    ids = eng.tokenize(greedy(CONTEXT + "second, other question?", "b"))
    cached_prompt = eng.tokenize(greedy(CONTEXT + "first question?", "a"))
    common = next(i for i, (x, y) in enumerate(zip(ids, cached_prompt, strict=False)) if x != y)
    spy.passes.clear()
    second = one(eng, CONTEXT + "second, other question?", "b")
    assert final(first).details is not None and final(first).details.cached_tokens == 0
    details = final(second).details
    assert details is not None and details.cached_tokens == common >= MIN_HIT_TOKENS
    assert spy.passes == [(1, len(ids) - common, common)], "one pass over the new suffix only"


def test_greedy_output_is_the_same_with_and_without_the_cache(tiny_model_dir: Path) -> None:
    """Sequential turns re-sending their history, then a burst mixing hits and misses."""
    turns = [CONTEXT + "q1?", CONTEXT + "q1? a1. q2?", CONTEXT + "q1? a1. q2? a2. q3?", "short, unrelated"]
    outputs: dict[bool, list[list[int]]] = {}
    for cached in (False, True):
        eng = engine(tiny_model_dir, prefix_cache=cached)
        seen = [token_ids(one(eng, prompt, f"t{i}", 16)) for i, prompt in enumerate(turns)]
        burst = [
            greedy(p, f"b{i}", 16) for i, p in enumerate([turns[1] + " again", "zz " + turns[0], turns[2]])
        ]
        events = run(eng, burst)
        seen += [token_ids(events[r.request_id]) for r in burst]
        outputs[cached] = seen
        cache = eng.prefix_cache
        assert (cache is not None) == cached
        if cache is not None:
            assert cache.hits >= 4, "the turns and the burst must have hit the cache"
    assert outputs[True] == outputs[False]


def test_one_cached_prefix_serves_concurrent_requests(tiny_model_dir: Path) -> None:
    eng, plain = engine(tiny_model_dir), engine(tiny_model_dir, prefix_cache=False)
    for e in (eng, plain):
        one(e, CONTEXT + "warm the cache", "w")
    burst = [greedy(CONTEXT + f"question number {i}?", f"c{i}", 12) for i in range(4)]
    events, expected = run(eng, burst), run(plain, burst)
    for r in burst:
        details = final(events[r.request_id]).details
        assert details is not None and details.cached_tokens >= MIN_HIT_TOKENS
        assert token_ids(events[r.request_id]) == token_ids(expected[r.request_id])


def test_entries_give_way_to_running_requests(tiny_model_dir: Path) -> None:
    budget = 2048
    eng, plain = (
        engine(tiny_model_dir, max_batch_total_tokens=budget),
        engine(tiny_model_dir, prefix_cache=False),
    )
    cache, slots = eng.prefix_cache, eng.runner.cache  # type: ignore[attr-defined]
    assert cache is not None
    for i in range(10):  # distinct prompts fill the cache while the engine is idle in between
        one(eng, f"{i} " * 28, f"fill{i}", 20)
    held = cache.tokens_held
    assert held > 0
    # a burst that needs most of the budget: the cache must shrink while it runs
    burst = [greedy(f"burst {i} " * 12, f"x{i}", 100) for i in range(5)]
    for r in burst:
        eng.add_request(r)
    peak_slots = 0
    while eng.has_work():
        eng.step()
        peak_slots = max(peak_slots, slots.slots * slots.capacity)
        assert cache.tokens_held + slots.slots * slots.capacity <= budget
    assert peak_slots + held > budget, "the burst must have needed the cached entries' room"
    events = run(plain, [greedy(f"burst {i} " * 12, f"x{i}", 100) for i in range(5)])
    again = run(eng, [greedy(f"burst {i} " * 12, f"y{i}", 100) for i in range(5)])
    for i in range(5):
        assert token_ids(again[f"y{i}"]) == token_ids(events[f"x{i}"])


def test_an_abort_leaves_the_cache_whole(tiny_model_dir: Path) -> None:
    eng, plain = engine(tiny_model_dir), engine(tiny_model_dir, prefix_cache=False)
    one(eng, CONTEXT + "seed the cache", "s")
    eng.add_request(greedy(CONTEXT + "to be aborted", "gone", 64))
    for _ in range(3):
        eng.step()  # prefilled from the cache, then a few tokens
    eng.abort_request("gone")
    while eng.has_work():
        eng.step()
    later = one(eng, CONTEXT + "after the abort", "after")
    details = final(later).details
    assert details is not None and details.cached_tokens >= MIN_HIT_TOKENS
    assert token_ids(later) == token_ids(one(plain, CONTEXT + "after the abort", "after"))


def test_prompt_logprobs_bypass_the_cache(tiny_model_dir: Path) -> None:
    eng = engine(tiny_model_dir)
    one(eng, CONTEXT + "seed", "s")
    params = SamplingParams(max_new_tokens=4, decoder_input_details=True)
    request = GenerateRequest(prompt=CONTEXT + "seed", params=params, request_id="lp")
    (done,) = [e for e in run(eng, [request])["lp"] if e.finished]
    assert done.details is not None and done.details.cached_tokens == 0
    assert len(done.details.prefill) == len(eng.tokenize(request))


def test_a_burst_on_one_context_reuses_the_first_prompt_while_it_still_runs(tiny_model_dir: Path) -> None:
    """Passes of one prompt each: the first request's prompt KV serves the others although it
    is still generating, and the rest of the burst then goes in one pass of the new suffixes."""
    limits = {"prefill_step_tokens": 48}  # one full prompt per pass
    eng, plain = engine(tiny_model_dir, **limits), engine(tiny_model_dir, prefix_cache=False, **limits)
    spy = PrefillSpy(eng)
    burst = [greedy(CONTEXT + f"question {i}?", f"q{i}", 40 if i == 0 else 8) for i in range(5)]
    events, expected = run(eng, burst), run(plain, burst)
    first_len = len(eng.tokenize(burst[0]))
    assert spy.passes[0] == (1, first_len, 0), "the first prompt alone, from position 0"
    assert len(spy.passes) + len(spy.ragged) == 2, "the other four continue it in one pass"
    for r in burst[1:]:
        details = final(events[r.request_id]).details
        assert details is not None and details.cached_tokens >= MIN_HIT_TOKENS
    for r in burst:
        assert token_ids(events[r.request_id]) == token_ids(expected[r.request_id])
    assert eng.prefix_cache is not None and eng.prefix_cache.hits == 4


def test_rows_continuing_different_cached_lengths_share_one_pass(tiny_model_dir: Path) -> None:
    """Chat turns of three conversations, cached to different lengths, in one ragged pass."""
    eng, plain = engine(tiny_model_dir), engine(tiny_model_dir, prefix_cache=False)
    openings = [
        CONTEXT + "a?",
        CONTEXT + "bb, and then a few more words?",
        "another topic entirely, with its own words " * 3,
    ]
    for e in (eng, plain):
        for i, p in enumerate(openings):
            one(e, p, f"t{i}")
    spy = PrefillSpy(eng)
    follow_ups = [greedy(p + " and then what happened next?", f"f{i}", 12) for i, p in enumerate(openings)]
    events, expected = run(eng, follow_ups), run(plain, follow_ups)
    cached = [final(events[r.request_id]).details.cached_tokens for r in follow_ups]  # type: ignore[union-attr]
    assert len(set(cached)) == 3 and min(cached) >= MIN_HIT_TOKENS
    assert spy.passes == [] and spy.ragged == [cached], "one pass, each row from its own cached length"
    for r in follow_ups:
        assert token_ids(events[r.request_id]) == token_ids(expected[r.request_id])


def test_a_running_prompt_that_fails_is_never_reused(tiny_model_dir: Path) -> None:
    """Its prefill registered it as a live prompt; its failed decode must take that back (its
    slot goes to another request), and a later prompt must not read the stale slot."""
    from tests.faults import FaultyRunner

    eng, plain = engine(tiny_model_dir), engine(tiny_model_dir, prefix_cache=False)
    eng.runner = FaultyRunner(eng.runner, phase="decode")
    eng.add_request(greedy(CONTEXT + "source", "poison-source", 8))
    while eng.has_work():  # the prefill passes, the decode fails; then the engine's probe
        eng.step()
    burst = [greedy("a prompt that shares nothing with the context", "filler", 30)]
    burst.append(greedy(CONTEXT + "follower", "follower", 8))
    events, expected = run(eng, burst), run(plain, burst)
    assert final(events["follower"]).details.cached_tokens == 0  # type: ignore[union-attr]
    assert token_ids(events["follower"]) == token_ids(expected["follower"])


def ids_request(ids: list[int], rid: str, max_new: int) -> GenerateRequest:
    return GenerateRequest(
        prompt_token_ids=ids, params=SamplingParams(max_new_tokens=max_new), request_id=rid
    )


def test_rows_whose_pads_would_leave_their_slot_go_one_pass_per_cached_length(tiny_model_dir: Path) -> None:
    """A short suffix padded to a long one would write K/V past its slot's end (the cache is
    192 positions: the short row reserves 128 + 64): those rows take a pass per cached length."""
    eng, plain = engine(tiny_model_dir), engine(tiny_model_dir, prefix_cache=False)
    seed_a, seed_b = list(range(40, 60)), list(range(100, 227))  # 20 and 127 prompt tokens
    for e in (eng, plain):
        run(e, [ids_request(seed_a, "a", 4)])
        run(e, [ids_request(seed_b, "b", 1)])
    spy = PrefillSpy(eng)
    rows = [ids_request(seed_a + [7, 8, 9, 10] * 25, "long", 8), ids_request(seed_b + [5], "short", 64)]
    events, expected = run(eng, rows), run(plain, rows)
    cached = [final(events[r.request_id]).details.cached_tokens for r in rows]  # type: ignore[union-attr]
    assert cached[1] == 127 and MIN_HIT_TOKENS <= cached[0] <= 24
    assert spy.capacity == 192
    assert spy.ragged == [] and [p[0] for p in spy.passes] == [1, 1]
    assert {p[2] for p in spy.passes} == set(cached)
    for r in rows:
        assert token_ids(events[r.request_id]) == token_ids(expected[r.request_id])


def test_a_prompt_sent_again_is_not_cached_twice(tiny_model_dir: Path) -> None:
    eng = engine(tiny_model_dir)
    one(eng, CONTEXT + "once", "a", 1)
    cache = eng.prefix_cache
    assert cache is not None
    held, entries = cache.tokens_held, len(cache)
    one(eng, CONTEXT + "once", "b", 1)
    assert (cache.tokens_held, len(cache)) == (held, entries)


# ------------------------------------------------------------------ the index alone
def kv(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).reshape(1, 1, 1, n, 1)


def test_matching_follows_block_chains_and_extends_inside_the_entry() -> None:
    cache = PrefixCache()
    tokens = list(range(100))
    cache.insert(tokens, kv(100))
    assert len(block_hashes(tokens)) == 100 // BLOCK
    hit = cache.match(list(range(40)) + [999, 998], limit=41)
    assert hit is not None and hit.tokens == 40  # two full blocks, then token by token
    limited = cache.match(tokens + [5], limit=70)
    assert limited is not None and limited.tokens == 70
    assert cache.match([999] * 40, limit=39) is None
    assert cache.match(list(range(10)), limit=9) is None  # below MIN_HIT_TOKENS
    assert (cache.queries, cache.hits, cache.hit_tokens) == (4, 2, 110)


def test_a_longer_turn_replaces_the_entry_it_contains_and_lru_eviction() -> None:
    cache = PrefixCache()
    cache.insert(list(range(40)), kv(40))
    cache.insert(list(range(80)), kv(80))  # turn 2 holds all of turn 1
    assert len(cache) == 1 and cache.tokens_held == 80
    cache.insert([7] * 50, kv(50))
    assert cache.match(list(range(80)) + [1], limit=80) is not None  # touches the first entry
    cache.evict_to(90)
    assert cache.tokens_held == 80, "the least recently used entry goes first"
    assert cache.match([7] * 50, limit=49) is None


@pytest.mark.parametrize("length", [MIN_HIT_TOKENS - 1, 0])
def test_entries_shorter_than_a_useful_hit_are_not_kept(length: int) -> None:
    cache = PrefixCache()
    assert cache.insert(list(range(length)), kv(max(length, 1))) is None
    assert len(cache) == 0
