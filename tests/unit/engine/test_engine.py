"""The engine on a tiny random Llama: exactness against transformers, batching, params."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine_driver import greedy, hf_greedy, run, token_ids
from tests.factories import engine_config
from twinserve.engine.engine import Engine
from twinserve.engine.factory import build_engine
from twinserve.engine.request import FinishReason, GenerateRequest, SamplingParams, TokenEvent
from twinserve.errors import ValidationError

PROMPTS = [
    "the quick brown fox",
    "hello world, hello there, general kenobi and the lazy dog",
    "once",
    "to be or not to be, that is",
    "héllo wörld 日本語",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return build_engine(engine_config(tiny_model_dir))


def logprobs(events: list[TokenEvent]) -> list[float | None]:
    return [e.token.logprob for e in events if e.token is not None]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_greedy_equals_transformers_generate_fp32(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    engine = build_engine(engine_config(model_dir))
    engine.eos_token_ids = frozenset()  # compare full lengths, like min_new_tokens
    expected = {p: hf_greedy(model_dir, p, 24) for p in PROMPTS}
    alone = {p: token_ids(run(engine, [greedy(p, "x")])["x"]) for p in PROMPTS}
    batched = run(engine, [greedy(p, f"r{i}") for i, p in enumerate(PROMPTS)])
    staggered = run(engine, [greedy(p, f"s{i}") for i, p in enumerate(PROMPTS)], join_every=3)
    for i, p in enumerate(PROMPTS):
        assert alone[p] == expected[p], p
        assert token_ids(batched[f"r{i}"]) == expected[p], p
        assert token_ids(staggered[f"s{i}"]) == expected[p], p


def test_stream_text_concatenates_to_generated_text(engine: Engine) -> None:
    events = run(engine, [greedy(p, f"r{i}", 40) for i, p in enumerate(PROMPTS)])
    for _rid, evs in events.items():
        final = evs[-1]
        assert final.finished and final.generated_text is not None
        assert "".join(e.text for e in evs) == final.generated_text
        ids = token_ids(evs)
        tok = engine.tokenizer
        assert final.generated_text == tok.decode(ids, skip_special_tokens=True)


def test_stop_sequence_across_tokens_is_never_leaked(engine: Engine) -> None:
    base = run(engine, [greedy(PROMPTS[1], "base", 40)])["base"]
    text = base[-1].generated_text or ""
    per_token = [e.token.text for e in base if e.token is not None]
    # a stop string that spans a token boundary
    boundary = len(per_token[0]) + len(per_token[1]) + len(per_token[2])
    stop = text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and stop in text
    events = run(
        engine,
        [
            GenerateRequest(
                prompt=PROMPTS[1], request_id="s", params=SamplingParams(max_new_tokens=40, stop=[stop])
            )
        ],
    )["s"]
    final = events[-1]
    assert final.finish_reason is FinishReason.STOP_SEQUENCE
    assert final.generated_text == text[: text.index(stop)]
    streamed = ""
    for e in events:
        streamed += e.text
        assert stop not in streamed
    assert streamed == final.generated_text


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = run(engine, [GenerateRequest(prompt=PROMPTS[0], params=params, request_id="a")])["a"]
    others = [
        GenerateRequest(
            prompt=p, request_id=f"o{i}", params=SamplingParams(max_new_tokens=20, do_sample=True)
        )
        for i, p in enumerate(PROMPTS)
    ]
    batch = run(engine, [*others, GenerateRequest(prompt=PROMPTS[0], params=params, request_id="b")])
    assert token_ids(alone) == token_ids(batch["b"])
    assert alone[-1].details is not None and alone[-1].details.seed == 1234
    other_seed = run(
        engine,
        [GenerateRequest(prompt=PROMPTS[0], request_id="c", params=params.model_copy(update={"seed": 99}))],
    )["c"]
    assert token_ids(other_seed) != token_ids(alone)


def test_details_prefill_and_top_tokens(engine: Engine, tiny_model_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=5, details=True, decoder_input_details=True, top_n_tokens=3)
    events = run(engine, [GenerateRequest(prompt=PROMPTS[0], params=params, request_id="d")])["d"]
    details = events[-1].details
    assert details is not None
    tok = engine.tokenizer
    prompt_ids = tok(PROMPTS[0])["input_ids"]
    assert [t.id for t in details.prefill] == prompt_ids
    assert details.prefill[0].logprob is None
    # prompt logprobs agree with transformers
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0], -1)
    for j in range(1, len(prompt_ids)):
        assert details.prefill[j].logprob == pytest.approx(logp[j - 1, prompt_ids[j]].item(), abs=1e-4)
    assert details.tokens[0].logprob == pytest.approx(logp[-1].max().item(), abs=1e-4)
    for tok_, top in zip(details.tokens, details.top_tokens, strict=False):
        assert len(top) == 3
        assert top[0].id == tok_.id  # greedy: the chosen token is the most likely
        assert top[0].logprob >= top[1].logprob >= top[2].logprob


def test_limits_are_validation_errors(engine: Engine) -> None:
    long_prompt = "hello world " * 200
    with pytest.raises(ValidationError, match="must have less than 128 tokens"):
        engine.add_request(GenerateRequest(prompt=long_prompt))
    with pytest.raises(ValidationError, match=r"`inputs` tokens \+ `max_new_tokens` must be <= 256"):
        engine.add_request(GenerateRequest(prompt="hello", params=SamplingParams(max_new_tokens=300)))
    # truncate keeps the last tokens, so the same prompt is accepted
    state = engine.add_request(
        GenerateRequest(
            prompt=long_prompt, request_id="t", params=SamplingParams(max_new_tokens=2, truncate=100)
        )
    )
    assert state.prompt_len == 100
    run(engine, [])


def test_return_full_text_and_eos(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=3, return_full_text=True)
    final = run(engine, [GenerateRequest(prompt="once", params=params, request_id="f")])["f"][-1]
    assert final.generated_text is not None and final.generated_text.startswith("once")
    # forcing the EOS token as the only choice ends with finish_reason eos_token
    eos = engine.tokenizer.eos_token_id
    engine.eos_token_ids = frozenset(range(len(engine.tokenizer)))
    try:
        final = run(engine, [greedy("once", "e")])["e"][-1]
    finally:
        engine.eos_token_ids = frozenset({eos})
    assert final.finish_reason is FinishReason.EOS_TOKEN and final.details.generated_tokens == 1


def test_default_max_new_tokens_fills_to_max_total(engine: Engine) -> None:
    state = engine.add_request(GenerateRequest(prompt="once", request_id="m"))
    assert state.max_new_tokens == 256 - state.prompt_len
    engine.abort_request("m")
    run(engine, [])


def test_cache_grows_and_compacts_under_churn_without_changing_results(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More requests than the first cache allocation holds, joining and leaving at different times.

    The real SlotKVCache is watched: it must be reallocated larger while rows are live (growth
    that keeps their positions) and rows must be moved down into freed slots (compaction).
    """
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(20)]
    lengths = [3 + (7 * i) % 20 for i in range(20)]
    solo = {
        i: run(engine, [greedy(p, "x", n)])["x"]
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=False))
    }
    cache = engine.runner.cache
    assert cache.slots == 0  # released while idle: the churn starts from an empty cache
    grown: list[tuple[int, int, int]] = []  # (slots before, slots after, live slots kept)
    moves: list[tuple[int, int, int]] = []
    real_fit, real_move = cache.fit, cache.move_slot

    def fit(slots: int, capacity: int, live_slots: int, max_tokens: int) -> None:
        before = cache.slots
        real_fit(slots, capacity, live_slots, max_tokens)
        if before and cache.slots > before:
            grown.append((before, cache.slots, live_slots))

    def move_slot(src: int, dst: int, length: int) -> None:
        moves.append((src, dst, length))
        real_move(src, dst, length)

    monkeypatch.setattr(cache, "fit", fit)
    monkeypatch.setattr(cache, "move_slot", move_slot)
    churn = run(
        engine,
        [greedy(p, f"c{i}", n) for i, (p, n) in enumerate(zip(prompts, lengths, strict=False))],
        join_every=1,
    )
    for i in range(20):
        assert token_ids(churn[f"c{i}"]) == token_ids(solo[i]), i
        # logprobs too: a KV position lost in a move or a regrowth shifts them, greedy ids rarely
        assert logprobs(churn[f"c{i}"]) == pytest.approx(logprobs(solo[i]), abs=1e-4), i
    # grew past its first allocation with requests running in it (their KV copied over)
    assert grown and all(live > 0 for _, _, live in grown), grown
    # compacted: rows moved from higher slots into freed lower ones, cached positions and all
    assert moves and all(src > dst and length > 0 for src, dst, length in moves), moves
    assert cache.slots == 0  # and released once idle again


def test_prompt_logprobs_in_chunks_equal_a_whole_log_softmax() -> None:
    from twinserve.engine.runner import target_logprobs

    logits = torch.randn(700, 97, dtype=torch.bfloat16) * 4  # more rows than one chunk
    targets = torch.randint(0, 97, (700,))
    want = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    assert target_logprobs(logits, targets) == pytest.approx(want.tolist(), abs=1e-5)


def test_prompt_logprobs_are_bounded_by_prompt_times_vocab(engine: Engine, monkeypatch) -> None:
    from twinserve.engine import engine as engine_module

    vocab = len(engine.tokenizer)
    monkeypatch.setattr(engine_module, "MAX_PROMPT_LOGPROB_VALUES", 10 * vocab)
    params = SamplingParams(max_new_tokens=2, decoder_input_details=True)
    engine.validate(GenerateRequest(prompt_token_ids=[5] * 10, params=params))
    with pytest.raises(
        ValidationError, match="`decoder_input_details` is limited to prompts of at most 10 tokens"
    ):
        engine.validate(GenerateRequest(prompt_token_ids=[5] * 11, params=params))


def test_the_kv_cache_outlives_a_short_pause_and_goes_after_the_idle_grace(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next burst after a pause shorter than `kv_cache_idle_release_s` reuses the allocation
    (no reallocation, no page faults); a longer pause gives the memory back."""
    import twinserve.engine.engine as engine_module

    clock = [1000.0]
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: clock[0])
    eng = build_engine(engine_config(tiny_model_dir, kv_cache_idle_release_s=10.0), warmup=False)
    cache = eng.runner.cache  # type: ignore[attr-defined]
    first = run(eng, [greedy(PROMPTS[0], "a", 6)])["a"]
    allocation = cache._kv
    assert allocation is not None, "kept while the engine has been idle for no time at all"
    clock[0] += 9.0
    eng.release_if_idle()
    assert cache._kv is allocation
    again = run(eng, [greedy(PROMPTS[0], "b", 6)])["b"]
    assert cache._kv is allocation, "the second burst fitted the kept allocation"
    assert token_ids(again) == token_ids(first)
    clock[0] += 9.0
    eng.release_if_idle()
    assert cache._kv is not None, "the grace counts from the end of the last work"
    clock[0] += 1.5
    eng.release_if_idle()
    assert cache.slots == 0 and cache.allocated_bytes == 0
