"""Prompt-lookup speculative decoding on the tiny model (fp32): greedy output token for token
and text for text the same as plain decoding, whatever the drafts; drafts the model agrees
with wholly, not at all or in part; EOS, stop token ids, stop strings and max_new_tokens
inside an accepted run; sampled rows untouched; the n-gram index alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engine_driver import greedy, run, token_ids
from tests.factories import engine_config
from twinserve.engine import speculation
from twinserve.engine.engine import Engine
from twinserve.engine.factory import build_engine
from twinserve.engine.models.llama import ForwardBatch
from twinserve.engine.request import GenerateRequest, SamplingParams, TokenEvent
from twinserve.engine.runner import SPECULATION_MAX_BATCH, SpeculationStats
from twinserve.engine.speculation import PromptLookup, accepted_length

# a random tiny model repeats itself, so its answers quote their own text: drafts get accepted
# (single tokens, mostly: see one_token_matches)
PROMPTS = [
    "the quick brown fox jumps over the lazy dog, the quick brown fox",
    "one two three four five six seven one two three",
    "hello there",
    "a b c d e f g h i j k l m n o p",
]


@pytest.fixture(autouse=True)
def one_token_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny random model seldom repeats two tokens in a row, which the lookup needs by
    default (MIN_NGRAM = 2); here a 1-token match proposes too, so that its answers get drafts
    accepted. What these tests check (output equal to plain decoding, the bookkeeping of
    accepted runs) does not depend on how drafts are found."""
    monkeypatch.setattr(speculation, "MIN_NGRAM", 1)


def engine(model: Path, speculate: int = 0, **overrides: Any) -> Engine:
    return build_engine(engine_config(model, speculate=speculate, **overrides), warmup=False)


def final(events: list[TokenEvent]) -> TokenEvent:
    return next(e for e in events if e.finished)


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def stats(eng: Engine) -> SpeculationStats:
    assert eng.speculation is not None
    return eng.speculation


class VerifySpy:
    """Counts the model's forward passes, and the verifying ones apart."""

    def __init__(self, eng: Engine) -> None:
        self.passes = 0
        self.verify_widths: list[int] = []
        model = eng.runner.model  # type: ignore[attr-defined]
        real = model.forward

        def forward(batch: ForwardBatch, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.passes += 1
            if batch.is_verify:
                self.verify_widths.append(batch.input_ids.shape[1])
            return real(batch, *args, **kwargs)

        model.forward = forward


def forced_drafts(monkeypatch: pytest.MonkeyPatch, draft: Callable[[list[int], int], list[int]]) -> None:
    """Replace prompt lookup with `draft(tokens so far, limit)`."""

    def propose(self: PromptLookup, limit: int) -> list[int]:
        return draft(self.tokens, limit)[:limit]

    monkeypatch.setattr(PromptLookup, "propose", propose)


def requests(max_new: int = 24, **params: Any) -> list[GenerateRequest]:
    return [
        GenerateRequest(prompt=p, params=SamplingParams(max_new_tokens=max_new, **params), request_id=f"r{i}")
        for i, p in enumerate(PROMPTS)
    ]


def outputs(
    eng: Engine, batch: list[GenerateRequest], join_every: int = 0
) -> dict[str, tuple[list[int], str, Any]]:
    events = run(eng, batch, join_every)
    return {
        rid: (token_ids(evs), text_of(evs), final(evs).finish_reason) for rid, evs in events.items() if evs
    }


# ---------------------------------------------------------------- greedy equality
@pytest.mark.parametrize("join_every", [0, 3], ids=["together", "joining"])
def test_greedy_output_and_streamed_text_are_the_same_as_plain_decoding(
    tiny_model_dir: Path, join_every: int
) -> None:
    plain, spec = engine(tiny_model_dir), engine(tiny_model_dir, speculate=5)
    expected = outputs(plain, requests(40), join_every)
    got = outputs(spec, requests(40), join_every)
    assert got == expected
    s = stats(spec)
    assert s.accepted_tokens > 0, "the repetitive answers must have accepted drafts"
    assert s.draft_tokens >= s.accepted_tokens


def test_one_stream_takes_fewer_passes_than_tokens(tiny_model_dir: Path) -> None:
    plain, spec = engine(tiny_model_dir), engine(tiny_model_dir, speculate=5)
    spy = VerifySpy(spec)
    request = requests(64, ignore_eos=True)[0]
    expected = outputs(plain, [request])
    assert outputs(spec, [request]) == expected
    assert spy.verify_widths and max(spy.verify_widths) <= 6
    assert spy.passes < 64, "accepted drafts must have saved decode steps"
    # one token per pass (the prefill's included), every other one a draft the model agreed with
    assert stats(spec).accepted_tokens == 64 - spy.passes


def test_a_batch_above_the_speculation_limit_decodes_plainly(tiny_model_dir: Path) -> None:
    spec = engine(tiny_model_dir, speculate=5)
    spy = VerifySpy(spec)
    many = [greedy(f"{PROMPTS[i % len(PROMPTS)]} {i}", f"m{i}", 12) for i in range(SPECULATION_MAX_BATCH + 2)]
    expected = outputs(engine(tiny_model_dir), many)
    assert outputs(spec, many) == expected
    # every step runs all rows (they arrive and end together): too many to verify
    assert spy.verify_widths == []


# ---------------------------------------------------------------- drafts the model takes wholly, not at all, in part
def continuation(model: Path, request: GenerateRequest) -> list[int]:
    (tokens, _, _) = outputs(engine(model), [request])[request.request_id]
    return tokens


@pytest.mark.parametrize("agree", ["all", "none", "some"])
def test_drafts_accepted_wholly_not_at_all_or_in_part(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, agree: str
) -> None:
    request = requests(30)[2]
    truth = continuation(tiny_model_dir, request)
    plain = engine(tiny_model_dir)
    prompt_len, vocab = len(plain.tokenize(request)), len(plain.tokenizer)

    def draft(tokens: list[int], limit: int) -> list[int]:
        done = len(tokens) - prompt_len  # answer tokens so far; the next ones are truth[done:]
        right = truth[done : done + limit]
        if agree == "all":
            return right
        wrong = [(t + 1) % vocab for t in right]
        return wrong if agree == "none" else right[:2] + wrong[2:]

    forced_drafts(monkeypatch, draft)
    spec = engine(tiny_model_dir, speculate=4)
    got = outputs(spec, [request])[request.request_id]
    assert got[0] == truth
    s = stats(spec)
    if agree == "all":
        assert s.accepted_tokens == s.draft_tokens > 0
    elif agree == "none":
        assert s.accepted_tokens == 0 and s.draft_tokens > 0
    else:
        assert 0 < s.accepted_tokens < s.draft_tokens


def right_drafts(monkeypatch: pytest.MonkeyPatch, truth: list[int], prompt_len: int) -> None:
    """Drafts that are always the model's own next tokens (and beyond where it stops)."""
    forced_drafts(monkeypatch, lambda tokens, limit: (truth + [7] * limit)[len(tokens) - prompt_len :])


def test_max_new_tokens_reached_inside_an_accepted_run(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = requests(30)[1]
    truth = continuation(tiny_model_dir, long)
    right_drafts(monkeypatch, truth, len(engine(tiny_model_dir).tokenize(long)))
    for max_new in (1, 2, 5, 7):
        request = requests(max_new)[1]
        expected = outputs(engine(tiny_model_dir), [request])
        got = outputs(engine(tiny_model_dir, speculate=4), [request])
        assert got == expected and len(got["r1"][0]) == max_new and got["r1"][2] == "length"


def test_eos_and_stop_token_ids_inside_an_accepted_run(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = requests(30)[0]
    truth = continuation(tiny_model_dir, base)
    right_drafts(monkeypatch, truth, len(engine(tiny_model_dir).tokenize(base)))
    stop_at = next(
        i for i in range(5, len(truth)) if truth[i] not in truth[:i]
    )  # first time this token shows
    request = GenerateRequest(
        prompt=base.prompt,
        params=SamplingParams(max_new_tokens=30, stop_token_ids=[truth[stop_at]]),
        request_id="r0",
    )
    expected = outputs(engine(tiny_model_dir), [request])
    spec = engine(tiny_model_dir, speculate=6)
    got = outputs(spec, [request])
    assert got == expected
    assert got["r0"][0] == truth[: stop_at + 1] and got["r0"][2] in ("stop_sequence", "eos_token")
    # the engine goes on: the finished row's KV (kept by the prefix cache) is whole
    assert outputs(spec, [base])["r0"][0] == truth


def test_a_stop_string_inside_an_accepted_run(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = requests(30)[3]
    plain_events = run(engine(tiny_model_dir), [base])["r3"]
    truth = token_ids(plain_events)
    right_drafts(monkeypatch, truth, len(engine(tiny_model_dir).tokenize(base)))
    text = text_of(plain_events)
    middle = next(
        i for i in range(len(text) // 2, len(text) - 3) if text[i : i + 3].strip() == text[i : i + 3]
    )
    stop = text[middle : middle + 3]
    for include in (False, True):
        request = GenerateRequest(
            prompt=base.prompt,
            params=SamplingParams(max_new_tokens=30, stop=[stop], include_stop_str_in_output=include),
            request_id="r3",
        )
        expected = outputs(engine(tiny_model_dir), [request])
        got = outputs(engine(tiny_model_dir, speculate=6), [request])
        assert got == expected and got["r3"][2] == "stop_sequence"


# ---------------------------------------------------------------- sampled rows
def test_sampled_rows_keep_their_tokens_beside_speculating_greedy_rows(tiny_model_dir: Path) -> None:
    def batch() -> list[GenerateRequest]:
        sampled = [
            GenerateRequest(
                prompt=p,
                params=SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.8, seed=11 + i),
                request_id=f"s{i}",
            )
            for i, p in enumerate(PROMPTS[:2])
        ]
        return sampled + [greedy(PROMPTS[0], "g", 20)]

    expected = outputs(engine(tiny_model_dir), batch())
    spec = engine(tiny_model_dir, speculate=4)
    got = outputs(spec, batch())
    assert got == expected
    assert stats(spec).draft_tokens > 0


def test_penalized_greedy_rows_do_not_speculate(tiny_model_dir: Path) -> None:
    spec = engine(tiny_model_dir, speculate=4)
    batch = requests(20, repetition_penalty=1.3)
    assert outputs(spec, batch) == outputs(engine(tiny_model_dir), batch)
    assert stats(spec).draft_tokens == 0


def test_top_tokens_and_logprobs_of_accepted_tokens_match_plain_decoding(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = requests(24, top_n_tokens=3, details=True)[0]
    plain = run(engine(tiny_model_dir), [request])["r0"]
    right_drafts(monkeypatch, token_ids(plain), len(engine(tiny_model_dir).tokenize(request)))
    spec = engine(tiny_model_dir, speculate=5)
    got = run(spec, [request])["r0"]
    assert stats(spec).accepted_tokens > 0
    assert [e.token.id for e in got if e.token] == [e.token.id for e in plain if e.token]
    for a, b in zip(got, plain, strict=True):
        assert a.token is not None and b.token is not None
        assert a.token.logprob == pytest.approx(b.token.logprob, abs=1e-4)
        assert [t.id for t in a.top_tokens] == [t.id for t in b.top_tokens]


def test_off_by_default(tiny_model_dir: Path) -> None:
    eng = engine(tiny_model_dir)
    assert eng.speculation is None
    assert eng.validate(greedy("hi", "x")).lookup is None


# ---------------------------------------------------------------- the index alone
def test_lookup_proposes_what_followed_the_latest_longest_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speculation, "MIN_NGRAM", 2)  # the default
    lookup = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 7])
    for t in (8, 2, 3):
        lookup.append(t)
    # suffix (8, 2, 3)? never before; (2, 3) last seen before 5
    assert lookup.propose(3) == [5, 6, 7]
    assert lookup.propose(1) == [5]
    assert lookup.propose(0) == []
    lookup.append(5)  # (2, 3, 5) occurred: what followed it comes next
    assert lookup.propose(10) == [6, 7, 8, 2, 3, 5]  # it may run into the text it continues
    assert PromptLookup([1, 2, 3]).propose(4) == []  # nothing repeats yet
    assert PromptLookup([4, 1, 4]).propose(4) == [], "a 1-token match proposes nothing"
    assert PromptLookup([4, 7, 1, 4, 7]).propose(4) == [1, 4, 7]
    monkeypatch.setattr(speculation, "MIN_NGRAM", 1)
    assert PromptLookup([4, 1, 4]).propose(4) == [1, 4]


def test_accepted_length_is_the_agreeing_prefix() -> None:
    assert accepted_length([1, 2, 3], [1, 2, 3]) == 3
    assert accepted_length([1, 2, 3], [1, 5, 3]) == 1
    assert accepted_length([1, 2], [4, 2]) == 0
    assert accepted_length([], [1]) == 0
