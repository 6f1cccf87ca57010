"""Slot KV cache: one row per running request, each at its own position.

Layout per layer: K and V of shape [slots, kv_heads, capacity, head_dim]. A request
owns one slot for its whole life and appends one position per decode step, so nothing
is re-padded or copied per step. The running batch is kept in slots 0..B-1 (a leaving
request's slot is filled by moving the last one in), so decode attention reads a plain
view of the cache instead of gathering it.

Memory is `slots × capacity` tokens; the scheduler plans both (rounded up, so
reallocations are rare) within `max_batch_total_tokens`, which is what bounds the KV
memory, and the cache is released once the engine has been idle for `kv_cache_idle_release_s`.
"""

from __future__ import annotations

import torch

CAPACITY_ROUND = 64
SLOTS_ROUND = 8


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class SlotKVCache:
    """Per-layer K/V tensors addressed by (slot, position)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self._kv: torch.Tensor | None = None  # [layers, 2, slots, kv_heads, capacity, head_dim]
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # views, made once per allocation

    @property
    def slots(self) -> int:
        return 0 if self._kv is None else self._kv.shape[2]

    @property
    def capacity(self) -> int:
        return 0 if self._kv is None else self._kv.shape[4]

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def allocated_bytes(self) -> int:
        return 0 if self._kv is None else self._kv.numel() * self._kv.element_size()

    def plan(self, slots: int, capacity: int, max_tokens: int) -> tuple[int, int] | None:
        """The allocation `fit` would make for this demand; None when the current one serves.

        It is kept when large enough and still within `max_tokens`. Capacity grows by half again
        at least (within `max_tokens`): a multi-turn chat's history grows every turn, and
        reallocating means zeroing and copying the whole cache (~30 ms of a turn's TTFT here).
        """
        cur_slots, cur_cap = self.slots, self.capacity
        if cur_slots >= slots and cur_cap >= capacity and cur_slots * cur_cap <= max_tokens:
            return None
        if capacity > cur_cap > 0:
            grown = round_up(cur_cap * 3 // 2, CAPACITY_ROUND)
            if slots * grown <= max_tokens:
                capacity = max(capacity, grown)
        return slots, capacity

    def fit(self, slots: int, capacity: int, live_slots: int, max_tokens: int) -> None:
        """Make room for `slots` rows of `capacity` positions, keeping slots 0..live_slots-1
        (reallocated to what `plan` says, when it says so)."""
        planned = self.plan(slots, capacity, max_tokens)
        if planned is None:
            return
        cur_slots, cur_cap = self.slots, self.capacity
        slots, capacity = planned
        kv = torch.zeros(
            (self.num_layers, 2, slots, self.num_kv_heads, capacity, self.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        live = min(live_slots, cur_slots, slots)
        if self._kv is not None and live:
            keep = min(cur_cap, capacity)
            kv[:, :, :live, :, :keep] = self._kv[:, :, :live, :, :keep]
        self._kv = None  # drop the old one before anything else allocates
        self._kv = kv
        self._layers = [(kv[i, 0], kv[i, 1]) for i in range(self.num_layers)]

    def release(self) -> None:
        """Free all memory (the engine is idle)."""
        self._kv = None
        self._layers = []

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[index]

    def copy_prefix(self, src: int, dsts: list[int], length: int) -> None:
        """Copy the first `length` positions of slot `src` into every slot of `dsts` (shared prompt prefix)."""
        assert self._kv is not None
        index = torch.tensor(dsts, dtype=torch.long, device=self._kv.device)
        self._kv[:, :, index, :, :length] = self._kv[:, :, src : src + 1, :, :length]

    def read_slot(self, slot: int, length: int) -> torch.Tensor:
        """A copy of the first `length` positions of `slot`: [layers, 2, kv_heads, length, head_dim]."""
        assert self._kv is not None
        return self._kv[:, :, slot, :, :length].clone()

    def write_slot(self, slot: int, kv: torch.Tensor, length: int) -> None:
        """Write the first `length` positions of `kv` (as `read_slot` returns it) into `slot`."""
        assert self._kv is not None
        self._kv[:, :, slot, :, :length] = kv[:, :, :, :length]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (compaction)."""
        assert self._kv is not None
        self._kv[:, :, dst, :, :length] = self._kv[:, :, src, :, :length]
