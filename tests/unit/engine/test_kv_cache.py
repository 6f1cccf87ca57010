from __future__ import annotations

import torch

from twinserve.engine.kv_cache import SlotKVCache


def _cache() -> SlotKVCache:
    return SlotKVCache(
        num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu")
    )


def test_fit_keeps_live_slots_when_growing() -> None:
    cache = _cache()
    cache.fit(2, 4, live_slots=0, max_tokens=100)
    k, _ = cache.layer(1)
    k[1, 0, :4] = torch.arange(8.0).view(4, 2)
    cache.fit(6, 8, live_slots=5, max_tokens=100)  # more live rows than were allocated
    assert (cache.slots, cache.capacity) == (6, 8)
    k, _ = cache.layer(1)
    assert torch.equal(k[1, 0, :4], torch.arange(8.0).view(4, 2))


def test_fit_reallocates_when_the_current_size_breaks_the_budget() -> None:
    cache = _cache()
    cache.fit(8, 4, live_slots=0, max_tokens=32)
    cache.fit(2, 16, live_slots=2, max_tokens=32)  # 8 x 16 would be over budget
    assert (cache.slots, cache.capacity) == (2, 16)
    assert cache.allocated_bytes == 2 * 2 * 2 * 1 * 16 * 2 * 4


def test_capacity_grows_by_half_again_so_a_growing_history_does_not_reallocate_each_turn() -> None:
    cache = _cache()
    cache.fit(4, 128, live_slots=0, max_tokens=4096)
    k, _ = cache.layer(0)
    k[3, 0, :128] = 1.0
    cache.fit(4, 140, live_slots=4, max_tokens=4096)  # the next turn needs 12 more positions
    assert (cache.slots, cache.capacity) == (4, 192)
    held = cache.layer(0)[0]
    assert cache.plan(4, 190, max_tokens=4096) is None  # the turn after fits as it is
    cache.fit(4, 190, live_slots=4, max_tokens=4096)
    assert cache.layer(0)[0] is held and bool((held[3, 0, :128] == 1.0).all())
    # no headroom past the budget: exactly what was asked
    cache.fit(4, 200, live_slots=4, max_tokens=4 * 200)
    assert (cache.slots, cache.capacity) == (4, 200)


def test_move_slot_copies_only_the_cached_prefix() -> None:
    cache = _cache()
    cache.fit(3, 4, live_slots=0, max_tokens=100)
    k, v = cache.layer(0)
    k[2, 0, :3] = 7.0
    v[2, 0, :3] = 9.0
    cache.move_slot(src=2, dst=0, length=3)
    k, v = cache.layer(0)
    assert torch.all(k[0, 0, :3] == 7.0) and torch.all(v[0, 0, :3] == 9.0)
    assert torch.all(k[0, 0, 3] == 0.0)
    cache.release()
    assert cache.allocated_bytes == 0
