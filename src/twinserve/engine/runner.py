"""Model runner: turns scheduled rows into one forward pass and sampled tokens.

The engine talks to it through the `Runner` protocol with plain data (rows in,
`RunnerOutput` out), so a test can wrap the real runner to record calls or inject faults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from twinserve.config import EngineConfig
from twinserve.engine.kv_cache import SlotKVCache
from twinserve.engine.loader import LoadedModel
from twinserve.engine.models.llama import ForwardBatch
from twinserve.engine.prefix_cache import MIN_HIT_TOKENS, LivePrefix, PrefixCache, PrefixHit
from twinserve.engine.request import RequestStatus
from twinserve.engine.sampling import fast_argmax, sample, top_tokens
from twinserve.engine.scheduler import SlotMove
from twinserve.engine.speculation import accepted_length
from twinserve.engine.state import RequestState


@dataclass(frozen=True)
class AcceptedToken:
    """A drafted token the model agreed with: its id, logprob and top alternatives."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RunnerOutput:
    """Per row: sampled token, its logprob, top alternatives; prompt logprobs where asked
    (prefill); the accepted drafted tokens that follow the sampled one (speculative decode)."""

    token_ids: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]
    prompt_logprobs: list[list[float] | None] = field(default_factory=list)
    accepted: list[list[AcceptedToken]] = field(default_factory=list)

    def accepted_of(self, row: int) -> list[AcceptedToken]:
        return self.accepted[row] if self.accepted else []

    @staticmethod
    def concat(outputs: list[RunnerOutput]) -> RunnerOutput:
        """The outputs of several passes, rows in order (rows run one pass each after a failure)."""
        return RunnerOutput(
            token_ids=[t for o in outputs for t in o.token_ids],
            logprobs=[lp for o in outputs for lp in o.logprobs],
            top_tokens=[top for o in outputs for top in o.top_tokens],
            prompt_logprobs=[p for o in outputs for p in (o.prompt_logprobs or [None] * len(o.token_ids))],
            accepted=[o.accepted_of(i) for o in outputs for i in range(len(o.token_ids))],
        )


@dataclass
class SpeculationStats:
    """Drafted and accepted tokens since start (what /metrics reports)."""

    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


# the largest batch that verifies drafts; larger ones decode one token per row (see _drafts)
SPECULATION_MAX_BATCH = 4


class Runner(Protocol):
    """What the engine needs from whatever executes the model."""

    def prepare_cache(self, slots: int, capacity: int, live_slots: int) -> None: ...

    def move_slot(self, move: SlotMove) -> None: ...

    def release_cache(self) -> None: ...

    def retain(self, state: RequestState) -> None: ...

    def cached_prefix_len(self, state: RequestState) -> int: ...

    def execute(self, rows: list[RequestState], *, prefill: bool) -> RunnerOutput: ...


class ModelRunner:
    """Runs the Llama-family model over the slot cache."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config = config
        self.device = loaded.device
        shape = self.model.shape
        self.cache = SlotKVCache(
            shape.num_layers, shape.num_kv_heads, shape.head_dim, self.model.act_dtype, self.device
        )
        self.prefix = PrefixCache() if config.prefix_cache else None
        self.speculation = SpeculationStats()
        # drafted tokens per step: config.speculate; a benchmark sets it to 0 for its baseline
        self.speculate = config.speculate

    # --------------------------------------------------------------- cache
    def prepare_cache(self, slots: int, capacity: int, live_slots: int) -> None:
        budget = self.config.max_batch_total_tokens
        planned = self.cache.plan(slots, capacity, budget)
        if self.prefix is not None and planned is not None:
            # running requests come first: cached prefixes give way to a larger slot cache
            self.prefix.evict_to(budget - planned[0] * planned[1])
        self.cache.fit(slots, capacity, live_slots, budget)

    def retain(self, state: RequestState) -> None:
        """Keep a finishing request's KV (its prompt and the answer written so far) for later
        prompts that start with it, within what the slot cache leaves of the KV budget."""
        if self.prefix is None:
            return
        self.prefix.drop_live(state)
        # a row that stopped inside an accepted run of drafts has KV beyond its last kept token
        n = min(state.num_cached, state.prompt_len + len(state.output_ids) - 1)
        if state.slot < 0 or state.status is RequestStatus.FINISHED_ERROR:
            return
        tokens = (state.prompt_ids + state.output_ids)[:n]
        room = self.config.max_batch_total_tokens - self.cache.slots * self.cache.capacity
        if n < MIN_HIT_TOKENS or self.cache.slots == 0 or n > room or self.prefix.holds(tokens):
            return
        self.prefix.evict_to(room - n)
        self.prefix.insert(tokens, self.cache.read_slot(state.slot, n))

    def cached_prefix_len(self, state: RequestState) -> int:
        """Prompt positions a prefill of `state` would take from the prefix cache as it is now:
        the scheduler sizes prefill passes by the rest."""
        if self.prefix is None or state.wants_prompt_logprobs:
            return 0
        hit = self.prefix.match(state.prompt_ids, state.prompt_len - 1, count=False)
        return 0 if hit is None else hit.tokens

    def move_slot(self, move: SlotMove) -> None:
        self.cache.move_slot(move.src, move.dst, move.length)

    def release_cache(self) -> None:
        self.cache.release()

    # ------------------------------------------------------------- forward
    def execute(self, rows: list[RequestState], *, prefill: bool) -> RunnerOutput:
        drafts = None if prefill else self._drafts(rows)
        if drafts is not None:
            return self._verify(rows, drafts)
        if prefill:
            logits, prompt_logprobs = self._prefill(rows)
            if self.prefix is not None:  # a burst on one context reuses the first prompt at once
                for r in rows:
                    self.prefix.add_live(r)
        else:
            logits, prompt_logprobs = self._decode(rows), [None] * len(rows)
        result = sample(logits, [r.sampling for r in rows], [r.top_n for r in rows])
        return RunnerOutput(
            token_ids=result.token_ids,
            logprobs=result.logprobs,
            top_tokens=result.top_tokens,
            prompt_logprobs=prompt_logprobs,
        )

    # --------------------------------------------------------- speculation
    def _drafts(self, rows: list[RequestState]) -> list[list[int]] | None:
        """Each row's drafted tokens (prompt lookup), or None when no row has any.

        Only small batches speculate: a verifying pass computes every drafted position, which
        is nearly free while a step is bound by reading the weights (a few rows) and a loss once
        it is bound by compute. Rows keep their positions within the cache's capacity.
        """
        n = self.speculate
        if not n or len(rows) > SPECULATION_MAX_BATCH:
            return None
        room = self.cache.capacity - 1 - max(r.num_cached for r in rows)  # the padded width fits every row
        limit = min(n, room)
        if limit <= 0:
            return None
        drafts: list[list[int]] = []
        for r in rows:
            left = r.max_new_tokens - len(r.output_ids) - 1  # tokens still allowed after this step's first
            if r.lookup is None or left <= 0 or not r.sampling.is_plain_greedy:
                drafts.append([])
            else:
                drafts.append(r.lookup.propose(min(limit, left)))
        return drafts if any(drafts) else None

    def _verify(self, rows: list[RequestState], drafts: list[list[int]]) -> RunnerOutput:
        """One pass over each row's last token and its drafts; sample the first position as
        plain decoding does, then keep the drafts the greedy tokens agree with."""
        n, width = len(rows), 1 + max(len(d) for d in drafts)
        ids = torch.zeros((n, width), dtype=torch.long)
        for i, (r, d) in enumerate(zip(rows, drafts, strict=True)):
            ids[i, : 1 + len(d)] = torch.tensor([r.last_token_id, *d], dtype=torch.long)
        # a row with fewer drafts computes pad tokens at the positions after them: their K/V
        # lands beyond what the row keeps, which no query reads before it is written again
        batch = self._own_positions_batch(rows, ids, [r.num_cached for r in rows])
        logits = self.model.forward(batch, self.cache).view(n, width, -1)
        first = sample(logits[:, 0], [r.sampling for r in rows], [r.top_n for r in rows])
        greedy = fast_argmax(logits.reshape(n * width, -1)).view(n, width).tolist()
        accepted: list[list[AcceptedToken]] = []
        stats = self.speculation
        stats.steps += 1
        for i, (r, d) in enumerate(zip(rows, drafts, strict=True)):
            if not d:
                accepted.append([])
                continue
            kept = accepted_length(d, [first.token_ids[i], *greedy[i][1:]])
            stats.draft_tokens += len(d)
            stats.accepted_tokens += kept
            accepted.append(self._accepted_tokens(logits[i, 1 : 1 + kept], greedy[i][1 : 1 + kept], r.top_n))
        return RunnerOutput(
            token_ids=first.token_ids,
            logprobs=first.logprobs,
            top_tokens=first.top_tokens,
            prompt_logprobs=[None] * n,
            accepted=accepted,
        )

    def _own_positions_batch(
        self, rows: list[RequestState], ids: torch.Tensor, starts: list[int]
    ) -> ForwardBatch:
        """A pass in which row i's tokens `ids[i]` sit at positions starts[i].. of its own slot,
        each attending causally to what the slot holds up to it (a verifying pass, a prefill
        that continues cached prefixes of different lengths)."""
        dev = self.device
        positions = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(ids.shape[1])
        attn_len = int(positions.max()) + 1
        mask = (torch.arange(attn_len) <= positions[..., None])[:, None]
        slots = [r.slot for r in rows]
        return ForwardBatch(
            input_ids=ids.to(dev),
            positions=positions.to(dev),
            slots=torch.tensor(slots, dtype=torch.long).to(dev),
            is_prefill=False,
            attn_len=attn_len,
            decode_mask=mask.to(dev),
            first_slot=first_slot(slots),
        )

    @staticmethod
    def _accepted_tokens(logits: torch.Tensor, token_ids: list[int], top_n: int) -> list[AcceptedToken]:
        """Logprobs and alternatives of accepted tokens, as `sample` reports a plain greedy row's."""
        if not token_ids:
            return []
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None]).squeeze(1)
        tops = top_tokens(logprobs, [top_n] * len(token_ids))
        return [
            AcceptedToken(id=t, logprob=lp, top=top)
            for t, lp, top in zip(token_ids, chosen.tolist(), tops, strict=True)
        ]

    def _decode(self, rows: list[RequestState]) -> torch.Tensor:
        dev = self.device
        positions = torch.tensor([r.num_cached for r in rows], dtype=torch.long)
        slots_list = [r.slot for r in rows]
        attn_len = int(positions.max()) + 1
        mask = None
        if len(rows) > 1 and int(positions.min()) + 1 != attn_len:
            mask = (torch.arange(attn_len)[None, :] <= positions[:, None])[:, None, None, :].to(dev)
        batch = ForwardBatch(
            input_ids=torch.tensor([r.last_token_id for r in rows], dtype=torch.long).to(dev),
            positions=positions.to(dev),
            slots=torch.tensor(slots_list, dtype=torch.long).to(dev),
            is_prefill=False,
            attn_len=attn_len,
            decode_mask=mask,
            first_slot=first_slot(slots_list),
        )
        return self.model.forward(batch, self.cache)

    def _prefill(self, rows: list[RequestState]) -> tuple[torch.Tensor, list[list[float] | None]]:
        """Rows whose prompt starts with a cached prefix get its KV copied into their slot and
        are prefilled from there: in one pass when they all fit it (`_prefill_cached`), else
        one pass per cached length. The rows without a hit go as one group."""
        for r in rows:
            hit = None
            if self.prefix is not None and not r.wants_prompt_logprobs:
                hit = self.prefix.match(r.prompt_ids, r.prompt_len - 1)
            if hit is not None:
                self._copy_hit(hit, r.slot)
            r.cached_tokens = hit.tokens if hit is not None else 0
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.cached_tokens, []).append(i)
        hits = [i for i, r in enumerate(rows) if r.cached_tokens]
        if len(groups) == 1:
            ((cached, _),) = groups.items()
            return self._prefill_group(rows, cached)
        passes: list[tuple[list[int], tuple[torch.Tensor, list[list[float] | None]]]] = []
        if len(groups) - (0 in groups) > 1 and self._fits_one_pass([rows[i] for i in hits]):
            hit_rows = [rows[i] for i in hits]
            passes.append((hits, (self._prefill_cached(hit_rows), [None] * len(hits))))
            groups = {0: groups[0]} if 0 in groups else {}
        for cached, members in groups.items():
            passes.append((members, self._prefill_group([rows[i] for i in members], cached)))
        order: list[int] = []
        parts: list[torch.Tensor] = []
        prompt_logprobs: list[list[float] | None] = [None] * len(rows)
        for members, (logits, logprobs) in passes:
            parts.append(logits)
            order.extend(members)
            for i, lp in zip(members, logprobs, strict=True):
                prompt_logprobs[i] = lp
        logits = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return logits[inverse.to(logits.device)], prompt_logprobs

    def _copy_hit(self, hit: PrefixHit, slot: int) -> None:
        source = hit.entry
        if isinstance(source, LivePrefix):  # a running request's prompt: slot to slot
            self.cache.copy_prefix(source.owner.slot, [slot], hit.tokens)
        else:
            self.cache.write_slot(slot, source.kv, hit.tokens)

    def _fits_one_pass(self, rows: list[RequestState]) -> bool:
        """Whether every row's padded new tokens stay inside its slot (pads sit after its prompt)."""
        width = max(r.prompt_len - r.cached_tokens for r in rows)
        return max(r.cached_tokens for r in rows) + width <= self.cache.capacity

    def _prefill_cached(self, rows: list[RequestState]) -> torch.Tensor:
        """Rows that continue cached prefixes of different lengths, in one pass: each row's new
        tokens at its own positions, attending to its slot through a per-row causal mask (the
        shape of a verifying pass). Its pads compute K/V beyond the row's prompt, which no
        query reads before decoding writes those positions again."""
        dev = self.device
        n, width = len(rows), max(r.prompt_len - r.cached_tokens for r in rows)
        ids = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : r.prompt_len - r.cached_tokens] = torch.tensor(r.prompt_ids[r.cached_tokens :])
        batch = self._own_positions_batch(rows, ids, [r.cached_tokens for r in rows])
        last = [i * width + r.prompt_len - r.cached_tokens - 1 for i, r in enumerate(rows)]
        return self.model.forward(batch, self.cache, torch.tensor(last, dtype=torch.long).to(dev))

    def _prefill_group(
        self, rows: list[RequestState], cached: int
    ) -> tuple[torch.Tensor, list[list[float] | None]]:
        """Prefill `rows` from position `cached` (KV before it is in their slots already), or,
        with nothing cached, from a prefix the group shares (computed once) or from 0."""
        dev = self.device
        prefix = cached
        if not cached and self.config.share_prompt_prefix:
            prefix = shared_prefix_len(rows)
            if prefix:
                self._prefill_prefix(rows, prefix)
        width = max(r.prompt_len for r in rows) - prefix
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : r.prompt_len - prefix] = torch.tensor(r.prompt_ids[prefix:], dtype=torch.long)
        lengths = torch.tensor([r.prompt_len - prefix for r in rows], dtype=torch.long)
        # logits: every prompt position for rows that want prompt logprobs, else the last one
        index: list[int] = []
        spans: list[tuple[int, int]] = []  # (first logits row, rows) per request
        for i, r in enumerate(rows):
            start = len(index)
            if r.wants_prompt_logprobs:  # never with a shared prefix (see shared_prefix_len)
                index.extend(range(i * width, i * width + r.prompt_len))
            else:
                index.append(i * width + r.prompt_len - prefix - 1)
            spans.append((start, len(index) - start))
        positions = torch.arange(prefix, prefix + width, dtype=torch.long)
        slots = [r.slot for r in rows]
        batch = ForwardBatch(
            input_ids=ids.to(dev),
            positions=positions.expand(len(rows), width).to(dev),
            slots=torch.tensor(slots, dtype=torch.long).to(dev),
            is_prefill=True,
            attn_len=prefix + width,
            lengths=lengths.to(dev),
            first_slot=first_slot(slots),
            prefix_len=prefix,
        )
        logits = self.model.forward(batch, self.cache, torch.tensor(index, dtype=torch.long).to(dev))
        last_rows = [start + n - 1 for start, n in spans]
        prompt_logprobs: list[list[float] | None] = []
        for r, (start, n) in zip(rows, spans, strict=False):
            if not r.wants_prompt_logprobs:
                prompt_logprobs.append(None)
                continue
            targets = torch.tensor(r.prompt_ids[1:], dtype=torch.long, device=logits.device)
            prompt_logprobs.append(target_logprobs(logits[start : start + n - 1], targets))
        if len(last_rows) != logits.shape[0]:
            logits = logits[torch.tensor(last_rows, device=logits.device)]
        return logits, prompt_logprobs

    def _prefill_prefix(self, rows: list[RequestState], prefix: int) -> None:
        """Prefill the prompt prefix all rows share once, in the first row's slot, then copy it."""
        dev = self.device
        first = rows[0]
        batch = ForwardBatch(
            input_ids=torch.tensor([first.prompt_ids[:prefix]], dtype=torch.long).to(dev),
            positions=torch.arange(prefix, dtype=torch.long)[None, :].to(dev),
            slots=torch.tensor([first.slot], dtype=torch.long).to(dev),
            is_prefill=True,
            attn_len=prefix,
            lengths=torch.tensor([prefix], dtype=torch.long).to(dev),
            first_slot=first.slot,
        )
        # the LM head runs on one position only; its logits are not needed
        self.model.forward(batch, self.cache, torch.tensor([prefix - 1], dtype=torch.long).to(dev))
        self.cache.copy_prefix(first.slot, [r.slot for r in rows[1:]], prefix)


# rows of prompt logits turned into logprobs at a time: the fp32 copy stays this small
_LOGPROB_CHUNK_ROWS = 256


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """log_softmax(logits)[i, targets[i]] for each row, in fp32, without a full-size copy.

    A whole-prompt log_softmax would hold a second prompt × vocab tensor in fp32; chunks of
    rows keep that to `_LOGPROB_CHUNK_ROWS` × vocab.
    """
    out: list[float] = []
    for begin in range(0, logits.shape[0], _LOGPROB_CHUNK_ROWS):
        chunk = logits[begin : begin + _LOGPROB_CHUNK_ROWS].float()
        picked = chunk.gather(1, targets[begin : begin + chunk.shape[0], None]).squeeze(1)
        out.extend((picked - torch.logsumexp(chunk, dim=-1)).tolist())
    return out


# sharing pays when it saves at least this many prompt tokens of compute (one extra pass costs ~that)
MIN_SHARED_TOKENS = 64
MIN_SHARED_PREFIX = 8


def first_slot(slots: list[int]) -> int | None:
    """The first of `slots` when they are consecutive and in order (a view of the cache holds
    their rows), else None."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slots[0]
    return None


def shared_prefix_len(rows: list[RequestState]) -> int:
    """Prompt tokens every row starts with (a system prompt, a chat template's header), or 0.

    Each row keeps at least one token of its own (its logits come from its last token); rows
    that want prompt logprobs need every position's logits, so they disable sharing.
    """
    if len(rows) < 2 or any(r.wants_prompt_logprobs for r in rows):
        return 0
    first = rows[0].prompt_ids
    limit = min(r.prompt_len for r in rows) - 1
    n = 0
    while n < limit and all(r.prompt_ids[n] == first[n] for r in rows[1:]):
        n += 1
    if n < MIN_SHARED_PREFIX or n * (len(rows) - 1) < MIN_SHARED_TOKENS:
        return 0
    return n
