"""Iteration-level scheduler: who is prefilled and who decodes in the next step.

Pure bookkeeping over `RequestState`s — no tensors, no model; its tests drive it through
the real runner of a tiny model and check the slots each pass ran with. Policy:
- FIFO admission, never skipping the head of the queue (no starvation);
- newcomers are prefilled together while the padded prefill (rows × longest part of a
  prompt to compute: what the prefix cache does not hold) stays within `max_batch_prefill_tokens` and the softer `prefill_step_tokens` (a lone
  prompt always goes), so running streams stall for at most one bounded prefill per step
  and the head of a burst gets its first token without waiting for the whole burst;
- a request is admitted only if the KV cache, sized for every running request's
  reserved tokens (prompt + max_new_tokens), stays within `max_batch_total_tokens`;
  one that does not fit waits, it is never truncated;
- running requests occupy slots 0..n-1; when one leaves, the last one moves into its
  slot, so decode reads a contiguous view of the cache.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twinserve.config import EngineConfig
from twinserve.engine.kv_cache import CAPACITY_ROUND, SLOTS_ROUND, round_up
from twinserve.engine.request import RequestStatus
from twinserve.engine.state import RequestState


@dataclass(frozen=True)
class SlotMove:
    """Copy `length` cached positions from slot `src` to slot `dst` before the next forward."""

    src: int
    dst: int
    length: int


@dataclass
class SchedulerOutput:
    """One step's work: rows to decode (slots 0..len-1), rows to prefill, cache size to hold them."""

    decode: list[RequestState] = field(default_factory=list)
    prefill: list[RequestState] = field(default_factory=list)
    cache_slots: int = 0
    cache_capacity: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    """Holds the waiting queue and the running batch."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []

    # ------------------------------------------------------------ queries
    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----------------------------------------------------------- mutation
    def add(self, state: RequestState) -> None:
        state.status = RequestStatus.WAITING
        self.waiting.append(state)

    def remove(self, state: RequestState) -> SlotMove | None:
        """Take a request out (finished or aborted); return the slot move that keeps slots compact."""
        if state.status is RequestStatus.WAITING or state.slot < 0:
            with contextlib.suppress(ValueError):
                self.waiting.remove(state)
            return None
        slot = state.slot
        last = self.running.pop()
        state.slot = -1
        if last is state:
            return None
        self.running[slot] = last
        move = SlotMove(src=last.slot, dst=slot, length=last.num_cached)
        last.slot = slot
        return move

    def schedule(self, cached_prefix: Callable[[RequestState], int] | None = None) -> SchedulerOutput:
        """Admit what fits from the queue; everyone already running decodes.

        `cached_prefix(state)`: the prompt positions a prefill would take from the prefix
        cache; a pass is sized by the positions it computes, so requests continuing cached
        prompts (chat turns, a shared RAG context) join one pass instead of one each. The
        cache may still drop an entry before the pass runs: that pass is then larger.
        """
        out = SchedulerOutput(decode=list(self.running))
        cfg = self.config
        capacity = max((r.reserved_tokens for r in self.running), default=0)
        prefill_budget = min(
            cfg.prefill_step_tokens or cfg.max_batch_prefill_tokens, cfg.max_batch_prefill_tokens
        )
        width = 0
        while self.waiting:
            head = self.waiting[0]
            n_rows = len(self.running) + 1
            if n_rows > cfg.max_batch_size:
                break
            computed = head.prompt_len - (cached_prefix(head) if cached_prefix is not None else 0)
            new_width = max(width, computed)
            if out.prefill and (len(out.prefill) + 1) * new_width > prefill_budget:
                break
            new_capacity = max(capacity, head.reserved_tokens)
            if self.cache_plan(n_rows, new_capacity) is None:
                break
            self.waiting.popleft()
            head.status = RequestStatus.RUNNING
            head.slot = len(self.running)
            head.mark_scheduled()
            self.running.append(head)
            out.prefill.append(head)
            width, capacity = new_width, new_capacity
        plan = self.cache_plan(len(self.running), capacity) if self.running else (0, 0)
        assert plan is not None
        out.cache_slots, out.cache_capacity = plan
        return out

    def cache_plan(self, slots: int, capacity: int) -> tuple[int, int] | None:
        """Cache size to allocate for this demand, or None if it exceeds the KV budget.

        With speculation, each row gets `speculate` positions of room beyond what it reserved
        (a verifying pass writes the drafts' K/V there) where that still fits; it never keeps
        a request out. Sizes are rounded up (fewer reallocations) only while they still fit.
        """
        lookahead = self.config.speculate
        if lookahead:
            plan = self._plan(slots, capacity + lookahead)
            if plan is not None:
                return plan
        return self._plan(slots, capacity)

    def _plan(self, slots: int, capacity: int) -> tuple[int, int] | None:
        budget = self.config.max_batch_total_tokens
        if slots * capacity > budget:
            return None
        cap = round_up(capacity, CAPACITY_ROUND)
        if slots * cap > budget:
            cap = capacity
        n = max(slots, min(round_up(slots, SLOTS_ROUND), budget // cap))
        return n, cap
