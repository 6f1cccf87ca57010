"""Turn a batch of next-token logits into next tokens, one request per row.

Processing follows TGI's order: the `min_tokens` ban on stop tokens (vLLM), repetition
penalty, frequency and presence penalties (OpenAI), then — for sampling rows only —
temperature, min-p (vLLM's place for it), top-k, top-p, typical-p (HF semantics, at least
one token kept). Greedy rows take the argmax of the penalized logits. Processed scores are
kept finite (an absurd penalty cannot turn a row into NaN), so every logprob is a number.

Determinism: each sampling request owns a CPU `torch.Generator` seeded once, and draws
exactly one uniform number from it per step; the token is found by inverse-CDF over the
row's own probabilities. Nothing random is shared between rows, so a seeded request
produces the same tokens alone or in any batch, on whatever device the logits live.

Cost per step: the work is batched over rows (one copy, one log-softmax, gather/scatter
over padded id tensors for penalties, top-p / typical-p searched among the top tokens
before any full sort); per-row Python is limited to building those id tensors and
drawing the uniform number. An all-greedy batch without penalties is one argmax and one
log-softmax.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from twinserve.engine.request import SamplingParams

_NEG_INF = float("-inf")
MIN_TEMPERATURE = 1e-6
# Top-p / typical-p look for their kept set among this many most likely tokens before
# sorting a whole row (a full sort of 49k logits is slow on CPU).
_CANDIDATES = 512


def new_seed() -> int:
    """A fresh seed in SamplingParams' range, for sampling requests that gave none."""
    return secrets.randbelow(2**63)


class _IdBuffer:
    """Growable int64 CPU tensor: appending is O(1) and reading needs no list → tensor copy."""

    def __init__(self, ids: list[int]) -> None:
        self._data = torch.empty(max(16, 2 * len(ids)), dtype=torch.int64)
        self._len = len(ids)
        if ids:
            self._data[: len(ids)] = torch.tensor(ids, dtype=torch.int64)

    def __len__(self) -> int:
        return self._len

    def append(self, token_id: int) -> None:
        if self._len == self._data.numel():
            grown = torch.empty(2 * self._len, dtype=torch.int64)
            grown[: self._len] = self._data
            self._data = grown
        self._data[self._len] = token_id
        self._len += 1

    def view(self) -> torch.Tensor:
        return self._data[: self._len]


class SamplingState:
    """What one request needs to choose its tokens: warper settings, RNG and token history.

    Call `append` with each token the request generates (the engine decides which ones
    count, e.g. not a token it then discards).
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: list[int],
        seed: int | None = None,
        stop_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.params = params
        self.is_sampling = params.is_sampling
        self.generator: torch.Generator | None = None
        self.seed: int | None = None
        if self.is_sampling:
            self.seed = seed if seed is not None else new_seed()
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(self.seed)
        # below ~1e-6 the distribution is one-hot at float precision anyway, and a smaller
        # divisor would underflow to 0 in fp32
        self.temperature = max(params.temperature, MIN_TEMPERATURE) if params.temperature is not None else 1.0
        self.top_k = params.top_k
        self.top_p = params.top_p
        self.typical_p = params.typical_p
        self.min_p = params.min_p
        # Tokens that end the request (EOS, stop token ids): banned until min_tokens are out.
        self.stop_ids = stop_ids
        self.min_tokens = params.min_tokens
        self._stop_id_tensor = (
            torch.tensor(sorted(stop_ids), dtype=torch.int64) if params.min_tokens else None
        )
        rep = params.repetition_penalty
        self.repetition_penalty = rep if rep is not None and rep != 1.0 else None
        freq = params.frequency_penalty
        self.frequency_penalty = freq if freq else None
        self.num_generated = 0
        # Repetition penalty: the distinct ids of prompt + generated tokens.
        self._seen: set[int] | None = None
        self._seen_ids: _IdBuffer | None = None
        if self.repetition_penalty is not None:
            self._seen = set(prompt_token_ids)
            self._seen_ids = _IdBuffer(sorted(self._seen))
        # Frequency penalty: every generated id (duplicates make the count).
        self._generated_ids = _IdBuffer([]) if self.frequency_penalty is not None else None
        # Presence penalty: the distinct generated ids.
        presence = params.presence_penalty
        self.presence_penalty = presence if presence else None
        self._present: set[int] | None = set() if self.presence_penalty is not None else None
        self._present_ids = _IdBuffer([]) if self.presence_penalty is not None else None

    def append(self, token_id: int) -> None:
        """Record a generated token for the penalties."""
        self.num_generated += 1
        if self._seen is not None and self._seen_ids is not None and token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids.append(token_id)
        if self._generated_ids is not None:
            self._generated_ids.append(token_id)
        if self._present is not None and self._present_ids is not None and token_id not in self._present:
            self._present.add(token_id)
            self._present_ids.append(token_id)

    @property
    def bans_stop_tokens(self) -> bool:
        """Whether EOS and the stop token ids are still banned (fewer than min_tokens generated)."""
        return (
            self._stop_id_tensor is not None and bool(self.stop_ids) and self.num_generated < self.min_tokens
        )

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy on the raw logits (no penalty, no ban): the argmax of the model's logits is
        the token, at any position of a verifying pass (what speculative decoding needs)."""
        return not (
            self.is_sampling
            or self.bans_stop_tokens
            or self._seen_ids is not None
            or self._generated_ids is not None
            or self._present_ids is not None
        )

    def draw_uniform(self) -> float:
        """The next U[0, 1) number of this request's own random stream."""
        if self.generator is None:
            raise RuntimeError("a greedy request has no random stream")
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


@dataclass
class SampleResult:
    """Chosen tokens of one step, row by row, with TGI-style log-probabilities.

    `logprobs[i]` is the log-softmax of row i's final processed distribution (warped for
    sampling rows, penalized for greedy rows) at the chosen token; `top_tokens[i]` holds
    the `top_n[i]` most likely `(id, logprob)` of that distribution, best first, without
    tokens the warpers removed (their logprob is -inf).
    """

    token_ids: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]


def sample(logits: torch.Tensor, states: list[SamplingState], top_n: list[int]) -> SampleResult:
    """Choose one token per row of `logits` ([B, V]); row i belongs to `states[i]`.

    `top_n[i]` alternatives are returned for row i (0 for none). The states are not
    updated: call `SamplingState.append` with the tokens the request keeps.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states) or len(top_n) != len(states):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(states)} states / {len(top_n)} top_n"
        )
    ban_rows = [i for i, s in enumerate(states) if s.bans_stop_tokens]
    rep_rows = [i for i, s in enumerate(states) if s._seen_ids]
    freq_rows = [i for i, s in enumerate(states) if s._generated_ids]
    presence_rows = [i for i, s in enumerate(states) if s._present_ids]
    sample_rows = [i for i, s in enumerate(states) if s.is_sampling]

    # Processed in place, so copied; an all-greedy, penalty-free batch is only read.
    in_place = bool(ban_rows or rep_rows or freq_rows or presence_rows or sample_rows)
    scores = logits.to(torch.float32, copy=in_place)
    for i in ban_rows:
        stop_ids = states[i]._stop_id_tensor
        assert stop_ids is not None
        scores[i, stop_ids.to(scores.device)] = _NEG_INF
    if rep_rows:
        _apply_repetition_penalty(scores, [states[i] for i in rep_rows], rep_rows)
    if freq_rows:
        _apply_frequency_penalty(scores, [states[i] for i in freq_rows], freq_rows)
    if presence_rows:
        _apply_presence_penalty(scores, [states[i] for i in presence_rows], presence_rows)
    if sample_rows:
        _warp(scores, [states[i] for i in sample_rows], sample_rows)
    if in_place:  # +inf (a tiny penalty divisor) or NaN would make the row's logprobs NaN
        torch.nan_to_num_(scores, nan=_NEG_INF, posinf=torch.finfo(scores.dtype).max, neginf=_NEG_INF)

    logprobs = torch.log_softmax(scores, dim=-1)
    token_ids = fast_argmax(scores)
    if sample_rows:
        idx = torch.tensor(sample_rows, device=scores.device)
        rows = logprobs if len(sample_rows) == len(states) else logprobs[idx]
        sampled = _inverse_cdf(rows, [states[i] for i in sample_rows], token_ids[idx])
        token_ids.index_copy_(0, idx, sampled)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    return SampleResult(
        token_ids=token_ids.tolist(),
        logprobs=chosen.tolist(),
        top_tokens=top_tokens(logprobs, top_n),
    )


def fast_argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of [B, V], the first index of the maximum like `torch.argmax`.

    The CPU argmax kernel is not vectorised (1.8 ms for 32 x 49152 here, against 0.13 ms
    for `amax`), so on CPU: maxima of blocks, the first block holding the row maximum,
    then argmax inside that block only.
    """
    rows, vocab = x.shape
    block = next((b for b in (1024, 2048, 512, 4096, 256, 1002) if vocab % b == 0), 0)
    if x.device.type != "cpu" or block == 0 or vocab <= block:
        return x.argmax(dim=-1)
    blocks = x.view(rows, vocab // block, block)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)
    inner = blocks[torch.arange(rows, device=x.device), best_block].argmax(dim=-1)
    return best_block * block + inner


def _rows_tensor(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _apply_repetition_penalty(scores: torch.Tensor, states: list[SamplingState], rows: list[int]) -> None:
    """CTRL-style: a seen token's logit is divided by the penalty if > 0, else multiplied."""
    _update_distinct_ids(
        scores,
        rows,
        [s._seen_ids.view() for s in states if s._seen_ids is not None],
        [s.repetition_penalty for s in states],
        lambda seen, penalty: torch.where(seen > 0, seen / penalty, seen * penalty),
    )


def _update_distinct_ids(
    scores: torch.Tensor,
    rows: list[int],
    views: list[torch.Tensor],
    penalties: list[float | None],
    update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """`scores[row, id] = update(scores[row, id], penalty)` for each row's distinct ids, batched."""
    ids = torch.nn.utils.rnn.pad_sequence(views, batch_first=True, padding_value=-1)
    # Pad with the row's own first id: duplicates then write the same value twice.
    ids = torch.where(ids < 0, ids[:, :1], ids).to(scores.device, non_blocking=True)
    penalty = torch.tensor(penalties, dtype=scores.dtype, device=scores.device).unsqueeze(1)
    row_idx = _rows_tensor(rows, scores.device).unsqueeze(1).expand_as(ids)
    scores[row_idx, ids] = update(scores[row_idx, ids], penalty)


def _apply_frequency_penalty(scores: torch.Tensor, states: list[SamplingState], rows: list[int]) -> None:
    """OpenAI-style: subtract penalty × (times the token was generated), prompt excluded."""
    views = [s._generated_ids.view() for s in states if s._generated_ids is not None]
    ids = torch.nn.utils.rnn.pad_sequence(views, batch_first=True, padding_value=-1)
    ids = ids.to(scores.device, non_blocking=True)
    penalty = torch.tensor(
        [s.frequency_penalty for s in states], dtype=scores.dtype, device=scores.device
    ).unsqueeze(1)
    # Padding adds 0 to token 0; equal addends make the accumulation order irrelevant.
    amount = torch.where(ids >= 0, -penalty, torch.zeros_like(penalty))
    row_idx = _rows_tensor(rows, scores.device).unsqueeze(1).expand_as(ids)
    scores.index_put_((row_idx, ids.clamp(min=0)), amount, accumulate=True)


def _apply_presence_penalty(scores: torch.Tensor, states: list[SamplingState], rows: list[int]) -> None:
    """OpenAI-style: subtract the penalty once from every token generated so far."""
    _update_distinct_ids(
        scores,
        rows,
        [s._present_ids.view() for s in states if s._present_ids is not None],
        [s.presence_penalty for s in states],
        lambda seen, penalty: seen - penalty,
    )


def _warp(scores: torch.Tensor, states: list[SamplingState], rows: list[int]) -> None:
    """Temperature, min-p, top-k, top-p, typical-p on the sampling rows of `scores`, in place."""
    everyone = len(rows) == scores.shape[0]
    row_idx = _rows_tensor(rows, scores.device)
    w = scores if everyone else scores[row_idx]
    dev = w.device

    temps = [s.temperature for s in states]
    if any(t != 1.0 for t in temps):
        # Shift each row's maximum to 0 first (softmax is shift-invariant): dividing by a tiny
        # temperature then sends the other logits towards -inf instead of overflowing to +inf.
        w.sub_(w.amax(dim=-1, keepdim=True).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0))
        w.div_(torch.tensor(temps, dtype=w.dtype, device=dev).unsqueeze(1))

    m_rows = [j for j, s in enumerate(states) if s.min_p is not None]
    if m_rows:
        floors = torch.tensor([math.log(states[j].min_p or 1.0) for j in m_rows], dtype=w.dtype, device=dev)
        _on_rows(w, m_rows, lambda x: _min_p(x, floors))

    k_rows = [j for j, s in enumerate(states) if s.top_k is not None and s.top_k < w.shape[1]]
    if k_rows:
        ks = torch.tensor([states[j].top_k for j in k_rows], device=dev)
        _on_rows(w, k_rows, lambda x: _top_k(x, ks))
    p_rows = [j for j, s in enumerate(states) if s.top_p is not None]
    if p_rows:
        ps = torch.tensor([states[j].top_p for j in p_rows], dtype=w.dtype, device=dev)
        _on_rows(w, p_rows, lambda x: _top_p(x, ps))
    t_rows = [j for j, s in enumerate(states) if s.typical_p is not None]
    if t_rows:
        ms = torch.tensor([states[j].typical_p for j in t_rows], dtype=w.dtype, device=dev)
        _on_rows(w, t_rows, lambda x: _typical_p(x, ms))

    if not everyone:
        scores.index_copy_(0, row_idx, w)


def _on_rows(w: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], None]) -> None:
    """Apply the in-place warper `fn` to `rows` of `w` (all of it when it is every row)."""
    if len(rows) == w.shape[0]:
        fn(w)
        return
    idx = _rows_tensor(rows, w.device)
    sub = w[idx]
    fn(sub)
    w.index_copy_(0, idx, sub)


def _min_p(x: torch.Tensor, log_floors: torch.Tensor) -> None:
    # vLLM semantics: drop tokens whose probability is below min_p × the top probability,
    # i.e. whose logit is below the top logit + log(min_p); the top token always stays.
    x.masked_fill_(x < x.amax(dim=-1, keepdim=True) + log_floors.unsqueeze(1), _NEG_INF)


def _top_k(x: torch.Tensor, ks: torch.Tensor) -> None:
    # HF semantics: keep every token whose logit reaches the k-th largest (ties included).
    top = x.topk(int(ks.max()), dim=-1).values
    kth = top.gather(1, (ks - 1).unsqueeze(1))
    x.masked_fill_(x < kth, _NEG_INF)


def _top_p(x: torch.Tensor, ps: torch.Tensor) -> None:
    # HF semantics: drop the least likely tokens whose total mass stays within 1 - p, i.e.
    # keep a token iff the mass of the tokens ranked above it is < p. The kept set is
    # usually small, so look among the most likely tokens first and sort the whole row
    # only where those do not reach p.
    k = min(x.shape[1], _CANDIDATES)
    values, _ = x.topk(k, dim=-1)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    threshold, covered = _top_p_threshold(values, lse, ps)
    if k < x.shape[1] and not bool(covered.all()):
        wide = (~covered).nonzero().squeeze(1)
        full, _ = torch.sort(x[wide], dim=-1, descending=True)
        threshold[wide] = _top_p_threshold(full, lse[wide], ps[wide])[0]
    x.masked_fill_(x < threshold, _NEG_INF)


def _top_p_threshold(
    values: torch.Tensor, lse: torch.Tensor, ps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest kept logit per row, from its top logits sorted descending; and whether
    those top logits held mass ≥ p (so that every token outside them is dropped)."""
    probs = (values - lse).exp()
    cum = probs.cumsum(dim=-1)
    n_keep = ((cum - probs) < ps.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp(min=1)
    return values.gather(1, n_keep - 1), cum[:, -1] >= ps


def _typical_p(x: torch.Tensor, masses: torch.Tensor) -> None:
    # HF semantics: keep the tokens whose surprisal is closest to the entropy, in that
    # order, until their mass reaches `mass` (at least one). Like top-p, try the most
    # likely tokens first: tokens outside them have surprisal ≥ the last one's, so when
    # the cut-off is below that bound none of them can be kept and no full sort is needed.
    normalized = torch.log_softmax(x, dim=-1)
    ent = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted = (-normalized - ent).abs()
    k = min(x.shape[1], _CANDIDATES)
    top_lp, top_idx = normalized.topk(k, dim=-1)
    cutoff = _typical_cutoff(shifted.gather(1, top_idx), top_lp.exp(), masses)
    if k < x.shape[1]:
        wide = (cutoff >= -top_lp[:, -1:] - ent).squeeze(1)
        if bool(wide.any()):
            rows = wide.nonzero().squeeze(1)
            cutoff[rows] = _typical_cutoff(shifted[rows], normalized[rows].exp(), masses[rows])
    x.masked_fill_(shifted > cutoff, _NEG_INF)


def _typical_cutoff(shifted: torch.Tensor, probs: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """Largest kept |surprisal - entropy| per row, over the given tokens."""
    sorted_shifted, order = torch.sort(shifted, dim=-1, stable=True)
    cum = probs.gather(1, order).cumsum(dim=-1)
    last = (cum < masses.unsqueeze(1)).sum(dim=1, keepdim=True).clamp(max=shifted.shape[1] - 1)
    return sorted_shifted.gather(1, last)


def _inverse_cdf(logprobs: torch.Tensor, states: list[SamplingState], fallback: torch.Tensor) -> torch.Tensor:
    """One draw per row from exp(logprobs), each with its request's own uniform number.

    A token with probability 0 is never chosen: `right=True` search returns the first
    index whose CDF exceeds the target, which an empty CDF step cannot do. A parallel
    scan (CUDA) may still give an empty step an ulp of height; such a draw takes
    `fallback` (the row's argmax) instead, so a masked token is never the answer.
    """
    cdf = logprobs.exp().cumsum_(dim=-1)
    total = cdf[:, -1:]
    u = torch.tensor([s.draw_uniform() for s in states], dtype=torch.float64)
    target = (u.to(cdf.device, non_blocking=True).unsqueeze(1) * total).to(cdf.dtype)
    # u < 1, but u × total may round up to total: keep the target strictly below it.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    possible = logprobs.gather(1, drawn).isfinite()
    return torch.where(possible, drawn, fallback.unsqueeze(1)).squeeze(1)


def top_tokens(logprobs: torch.Tensor, top_n: list[int]) -> list[list[tuple[int, float]]]:
    out: list[list[tuple[int, float]]] = [[] for _ in top_n]
    rows = [i for i, n in enumerate(top_n) if n > 0]
    if not rows:
        return out
    n_max = min(max(top_n), logprobs.shape[1])
    sub = logprobs if len(rows) == len(top_n) else logprobs[_rows_tensor(rows, logprobs.device)]
    values, ids = sub.topk(n_max, dim=-1)
    for row, vals, toks in zip(rows, values.tolist(), ids.tolist(), strict=True):
        n = top_n[row]
        out[row] = [(t, v) for t, v in zip(toks[:n], vals[:n], strict=True) if v != _NEG_INF]
    return out
