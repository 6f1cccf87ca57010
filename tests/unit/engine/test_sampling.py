from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from twinserve.engine import sampling
from twinserve.engine.request import SamplingParams
from twinserve.engine.sampling import SampleResult, SamplingState, new_seed, sample

V = 64


def _state(prompt: list[int] | None = None, seed: int | None = 0, **params: Any) -> SamplingState:
    return SamplingState(SamplingParams(**params), prompt or [], seed)


def _logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def _run(states: list[SamplingState], logits: torch.Tensor, top_n: list[int] | None = None) -> SampleResult:
    return sample(logits, states, top_n or [0] * len(states))


def test_greedy_is_argmax_and_logprobs_match_log_softmax() -> None:
    logits = _logits(4)
    res = _run([_state() for _ in range(4)], logits)
    assert res.token_ids == logits.argmax(-1).tolist()
    want = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    assert res.logprobs == pytest.approx(want.tolist(), abs=1e-6)
    assert res.top_tokens == [[], [], [], []]


def test_input_logits_are_not_modified() -> None:
    logits = _logits(3)
    before = logits.clone()
    states = [
        _state(prompt=[1, 2, 3], repetition_penalty=1.5),
        _state(do_sample=True, top_k=3, top_p=0.5, typical_p=0.9, temperature=0.5),
        _state(frequency_penalty=1.0),
    ]
    states[2].append(5)
    _run(states, logits)
    assert torch.equal(logits, before)


def test_top_n_ordering_and_values() -> None:
    logits = _logits(3)
    res = _run([_state(), _state(), _state()], logits, top_n=[5, 0, 2])
    lp = torch.log_softmax(logits, -1)
    for row, n in [(0, 5), (2, 2)]:
        ids = [t for t, _ in res.top_tokens[row]]
        vals = [v for _, v in res.top_tokens[row]]
        assert ids == lp[row].topk(n).indices.tolist()
        assert vals == sorted(vals, reverse=True)
        assert vals == pytest.approx(lp[row, ids].tolist(), abs=1e-6)
    assert res.top_tokens[1] == []


def test_top_n_uses_the_warped_distribution_and_drops_removed_tokens() -> None:
    logits = _logits(1)
    res = _run([_state(do_sample=True, top_k=2, seed=3)], logits, top_n=[5])
    assert len(res.top_tokens[0]) == 2
    assert sum(math.exp(v) for _, v in res.top_tokens[0]) == pytest.approx(1.0, abs=1e-5)
    assert res.logprobs[0] in [v for _, v in res.top_tokens[0]]


def test_top_k_1_equals_greedy() -> None:
    logits = _logits(8, seed=1)
    states = [_state(do_sample=True, top_k=1, seed=s) for s in range(8)]
    for _ in range(5):
        res = _run(states, logits)
        assert res.token_ids == logits.argmax(-1).tolist()
        assert res.logprobs == pytest.approx([0.0] * 8, abs=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        {"do_sample": True},
        {"temperature": 0.3},
        {"temperature": 2.0},
        {"top_k": 5},
        {"top_p": 0.5},
        {"typical_p": 0.5},
        {"temperature": 0.7, "top_k": 10, "top_p": 0.9, "typical_p": 0.95},
    ],
)
def test_samples_only_from_the_allowed_set(params: dict[str, Any]) -> None:
    logits = _logits(1, seed=2)
    state = _state(seed=7, **params)
    allowed = _allowed(logits[0], params)
    seen = set()
    for _ in range(300):
        res = _run([state], logits)
        tok = res.token_ids[0]
        assert tok in allowed
        seen.add(tok)
        assert math.isfinite(res.logprobs[0]) and res.logprobs[0] <= 0
    p_max = float(torch.softmax(logits[0] / params.get("temperature", 1.0), -1).max())
    if len(allowed) > 1 and p_max < 0.9:
        assert len(seen) > 1  # it does sample


def _allowed(row: torch.Tensor, params: dict[str, Any]) -> set[int]:
    """Reference implementation of the HF warpers on one row (float64, obvious loops)."""
    x = row.double() / params.get("temperature", 1.0)
    keep = set(range(len(x)))
    if "top_k" in params:
        kth = sorted(x.tolist(), reverse=True)[params["top_k"] - 1]
        keep &= {i for i in keep if x[i] >= kth}
    x = torch.where(torch.tensor([i in keep for i in range(len(x))]), x, -math.inf)
    if "top_p" in params:
        probs = torch.softmax(x, -1)
        order = probs.argsort(descending=True).tolist()
        mass, kept = 0.0, set()
        for i in order:  # keep tokens until the mass reaches top_p
            kept.add(i)
            mass += float(probs[i])
            if mass >= params["top_p"]:
                break
        keep &= kept
        x = torch.where(torch.tensor([i in keep for i in range(len(x))]), x, -math.inf)
    if "typical_p" in params:
        probs = torch.softmax(x, -1)
        logp = torch.log(probs)
        ent = -float(torch.nansum(probs * logp))
        order = sorted((i for i in keep), key=lambda i: abs(-float(logp[i]) - ent))
        mass, kept = 0.0, set()
        for i in order:
            kept.add(i)
            mass += float(probs[i])
            if mass >= params["typical_p"]:
                break
        keep &= kept
    return keep


def test_warped_distribution_matches_reference_sets() -> None:
    logits = _logits(6, seed=4)
    params = {"temperature": 0.8, "top_k": 20, "top_p": 0.8, "typical_p": 0.7}
    res = _run([_state(seed=1, **params) for _ in range(6)], logits, top_n=[5] * 6)
    for row in range(6):
        assert {t for t, _ in res.top_tokens[row]} <= _allowed(logits[row], params)


def test_empirical_distribution_follows_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    state = _state(do_sample=True, seed=11)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[_run([state], logits).token_ids[0]] += 1
    assert torch.allclose(counts / n, torch.softmax(logits[0], -1), atol=0.03)


def test_repetition_penalty_changes_argmax() -> None:
    logits = torch.tensor([[4.0, 3.0, 1.0, -2.0, -2.5]])
    assert _run([_state(prompt=[0])], logits).token_ids == [0]
    # 4/2 = 2 < 3: token 1 wins; the logprob is of the penalized distribution.
    res = _run([_state(prompt=[0], repetition_penalty=2.0)], logits)
    assert res.token_ids == [1]
    penalized = torch.tensor([[2.0, 3.0, 1.0, -2.0, -2.5]])
    assert res.logprobs[0] == pytest.approx(float(torch.log_softmax(penalized, -1)[0, 1]), abs=1e-6)
    # Negative logits are multiplied (move away from 0): -1 * 2 = -2 < -1.5.
    negative = torch.tensor([[-1.0, -1.5]])
    assert _run([_state(prompt=[0], repetition_penalty=2.0)], negative).token_ids == [1]
    # A penalty < 1 rewards seen tokens: 1.0 / 0.2 = 5 > 4.
    assert _run([_state(prompt=[2], repetition_penalty=0.2)], logits).token_ids == [2]


def test_repetition_penalty_counts_prompt_and_generated() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    state = _state(prompt=[2], repetition_penalty=3.0)
    assert _run([state], logits).token_ids == [0]
    state.append(0)  # now 0 → 1.0 and 1 stays 2.0
    assert _run([state], logits).token_ids == [1]
    state.append(1)  # 2.0 → 0.667; all penalized: 1.0, 0.667, 0.333
    assert _run([state], logits).token_ids == [0]


def test_frequency_penalty_counts_generated_tokens_only() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    state = _state(prompt=[0, 0, 0, 0], frequency_penalty=1.0)
    assert _run([state], logits).token_ids == [0]  # the prompt does not count
    state.append(0)  # 3 - 1 = 2 < 2.5
    assert _run([state], logits).token_ids == [1]
    state.append(1)
    state.append(1)  # token 1: 2.5 - 2 = 0.5; token 0: 2
    res = _run([state], logits, top_n=[3])
    assert res.token_ids == [0]
    want = torch.log_softmax(torch.tensor([2.0, 0.5, 0.0]), -1)
    assert [v for _, v in res.top_tokens[0]] == pytest.approx(want.tolist(), abs=1e-6)


def test_negative_frequency_penalty_encourages_repeats() -> None:
    logits = torch.tensor([[1.0, 1.5]])
    state = _state(frequency_penalty=-1.0)
    state.append(0)
    assert _run([state], logits).token_ids == [0]


def test_penalties_on_some_rows_only() -> None:
    logits = torch.tensor([[4.0, 3.0, 0.0]] * 3)
    a = _state(prompt=[0], repetition_penalty=2.0)
    b = _state(prompt=[0])
    c = _state(frequency_penalty=2.0)
    c.append(0)
    assert _run([a, b, c], logits).token_ids == [1, 0, 1]
    assert _run([b, b, b], logits).token_ids == [0, 0, 0]


def _samples(states: list[SamplingState], rows: list[torch.Tensor], steps: int) -> list[list[int]]:
    out: list[list[int]] = []
    for step in range(steps):
        res = _run(states, torch.stack([r[step] for r in rows]))
        for s, tok in zip(states, res.token_ids, strict=True):
            s.append(tok)
        out.append(res.token_ids)
    return out


def test_same_seed_same_tokens_alone_or_in_a_batch() -> None:
    steps, vocab = 20, 1000
    params = {"temperature": 0.9, "top_p": 0.95, "repetition_penalty": 1.2, "frequency_penalty": 0.3}
    mine = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(0))
    alone = [r[0] for r in _samples([_state(prompt=[1, 2], seed=42, **params)], [mine], steps)]

    others = [torch.randn(steps, vocab, generator=torch.Generator().manual_seed(i)) for i in range(1, 5)]
    batch_states = [
        _state(seed=1, do_sample=True, top_k=50),
        _state(prompt=[3], repetition_penalty=1.3),  # greedy
        _state(prompt=[1, 2], seed=42, **params),  # the same request as `alone`
        _state(seed=2, typical_p=0.5),
        _state(seed=3, temperature=1.5, frequency_penalty=1.0),
    ]
    rows = [others[0], others[1], mine, others[2], others[3]]
    batched = [r[2] for r in _samples(batch_states, rows, steps)]
    assert batched == alone
    assert len(set(alone)) > 1


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(30, 1000)  # uniform: any difference comes from the seed
    a = _samples([_state(do_sample=True, seed=1)], [logits], 30)
    b = _samples([_state(do_sample=True, seed=2)], [logits], 30)
    c = _samples([_state(do_sample=True, seed=1)], [logits], 30)
    assert a != b
    assert a == c


def test_seed_is_chosen_when_missing_and_only_for_sampling() -> None:
    assert _state(seed=None).seed is None  # greedy: no random stream
    s = _state(seed=None, do_sample=True)
    assert s.seed is not None and 0 <= s.seed < 2**63
    assert 0 <= new_seed() < 2**63
    assert _state(seed=5, top_k=3).seed == 5


def test_top_k_larger_than_vocab_is_harmless() -> None:
    logits = _logits(2, vocab=8)
    res = _run([_state(top_k=100, seed=1), _state()], logits)
    assert 0 <= res.token_ids[0] < 8


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 4), [_state()], [0])


def _hf_warped(logits: torch.Tensor, prompt: list[int], **params: Any) -> torch.Tensor:
    """The same pipeline built from transformers' processors (the semantics TGI follows)."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    ids = torch.tensor([prompt])
    x = logits.clone()
    if "repetition_penalty" in params:
        x = RepetitionPenaltyLogitsProcessor(params["repetition_penalty"])(ids, x)
    if "temperature" in params:
        x = TemperatureLogitsWarper(params["temperature"])(ids, x)
    if "top_k" in params:
        x = TopKLogitsWarper(params["top_k"])(ids, x)
    if "top_p" in params:
        x = TopPLogitsWarper(params["top_p"])(ids, x)
    if "typical_p" in params:
        x = TypicalLogitsWarper(params["typical_p"])(ids, x)
    return x


@pytest.mark.parametrize("scale", [0.5, 4.0])  # flat and peaked rows
@pytest.mark.parametrize(
    "params",
    [
        {"top_p": 0.9},
        {"top_p": 0.3},
        {"typical_p": 0.9},
        {"typical_p": 0.2},
        {"temperature": 0.7, "top_k": 50, "top_p": 0.8},
        {"repetition_penalty": 1.3, "temperature": 1.3, "top_p": 0.95, "typical_p": 0.95},
    ],
)
def test_kept_tokens_match_transformers(scale: float, params: dict[str, Any]) -> None:
    vocab = 2000  # more than the candidate count: exercises the shortcut and the fallback
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5)) * scale
    prompt = list(range(0, 300, 3))
    res = sample(logits, [_state(prompt=prompt, seed=1, **params) for _ in range(4)], [0] * 4)
    for row in range(4):
        want = _hf_warped(logits[row : row + 1], prompt, **params)
        kept = set(torch.isfinite(want[0]).nonzero().squeeze(1).tolist())
        assert res.token_ids[row] in kept
        mine = _warped_row(logits[row], prompt, params)
        assert set(torch.isfinite(mine).nonzero().squeeze(1).tolist()) == kept
        assert torch.allclose(
            torch.log_softmax(mine, -1)[list(kept)], torch.log_softmax(want[0], -1)[list(kept)], atol=1e-5
        )


def _warped_row(row: torch.Tensor, prompt: list[int], params: dict[str, Any]) -> torch.Tensor:
    """This module's processed distribution for one row, read back through top_n."""
    state = _state(prompt=prompt, seed=1, **params)
    lp = torch.full_like(row, -math.inf)
    res = sample(row.unsqueeze(0), [state], [row.numel()])
    for tok, v in res.top_tokens[0]:
        lp[tok] = v
    return lp


@pytest.mark.parametrize("scale", [0.3, 1.0, 5.0])
def test_candidate_shortcut_equals_full_sort(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    logits = torch.randn(8, 3000, generator=torch.Generator().manual_seed(9)) * scale
    ps = torch.linspace(0.05, 0.95, 8)
    results = []
    for candidates in (16, 3000):
        monkeypatch.setattr(sampling, "_CANDIDATES", candidates)
        x, y = logits.clone(), logits.clone()
        sampling._top_p(x, ps)
        sampling._typical_p(y, ps)
        results.append((torch.isfinite(x), torch.isfinite(y)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


class _FixedUniform:
    def __init__(self, u: float) -> None:
        self.u = u

    def draw_uniform(self) -> float:
        return self.u


@pytest.mark.parametrize("u", [0.0, 0.25, 0.4999999, 0.5, 0.75, 1 - 1e-12, 1 - 2**-53])
def test_inverse_cdf_never_draws_zero_probability(u: float) -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    fallback = torch.tensor([1, 2])
    drawn = sampling._inverse_cdf(probs.log(), [_FixedUniform(u)] * 2, fallback)  # type: ignore[list-item]
    assert drawn[0].item() == (1 if u < 0.5 else 3)
    assert drawn[1].item() == 2


@pytest.mark.parametrize("vocab", [49152, 1000, 128256, 300])
def test_fast_argmax_equals_argmax_including_ties(vocab: int) -> None:
    from twinserve.engine.sampling import fast_argmax

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(7, vocab, generator=g)
    x[1] = 0.0  # all tied: the first index wins
    x[2, vocab // 3] = 50.0
    x[2, vocab - 1] = 50.0  # a tie across blocks
    x[3, 5] = float("inf")
    assert torch.equal(fast_argmax(x), x.argmax(dim=-1))


def test_presence_penalty_subtracts_once_per_generated_token() -> None:
    logits = torch.zeros(1, V)
    state = _state(presence_penalty=1.5)
    for token in (3, 3, 3, 7):
        state.append(token)
    res = _run([state], logits, top_n=[V])
    scores = dict(res.top_tokens[0])
    # a token generated three times is penalised like one generated once (unlike frequency)
    assert scores[3] == pytest.approx(scores[7]) and scores[0] - scores[3] == pytest.approx(1.5, abs=1e-5)


def test_min_p_drops_tokens_below_a_share_of_the_top_probability() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04] + [1e-9] * (V - 5)]))
    kept = {t for t, lp in _run([_state(min_p=0.15, do_sample=True)], logits, top_n=[V]).top_tokens[0]}
    assert kept == {0, 1, 2}  # p >= 0.15 * 0.5 = 0.075
    draws = {_run([_state(seed=s, min_p=0.15, do_sample=True)], logits).token_ids[0] for s in range(60)}
    assert draws <= {0, 1, 2} and len(draws) > 1


def test_stop_tokens_are_banned_until_min_tokens_are_out() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 10.0  # the stop token would win every time
    state = SamplingState(SamplingParams(min_tokens=2), [], None, stop_ids=frozenset({5}))
    firsts = []
    for _ in range(3):
        token = _run([state], logits).token_ids[0]
        firsts.append(token)
        state.append(token)
    assert firsts[0] != 5 and firsts[1] != 5 and firsts[2] == 5


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-300, "do_sample": True},  # underflows to 0 in fp32 if not clamped
        {"temperature": 1e-30, "do_sample": True},
        {"repetition_penalty": 1e-300},  # a logit divided by ~0 is +inf
        {"repetition_penalty": 1e-40, "temperature": 0.5, "top_p": 0.9},
    ],
)
def test_extreme_but_valid_parameters_keep_logprobs_finite(params: dict[str, Any]) -> None:
    logits = _logits(2)
    states = [_state(prompt=list(range(V)), **params) for _ in range(2)]
    res = _run(states, logits, top_n=[3, 3])
    assert all(math.isfinite(lp) for lp in res.logprobs)
    assert all(math.isfinite(lp) for top in res.top_tokens for _, lp in top)
    if params.get("temperature", 1) < 1e-20:  # near-greedy: the argmax
        assert res.token_ids == logits.argmax(-1).tolist()
