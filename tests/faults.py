"""Fault injection for engine tests: the real model runner, made to fail on chosen rows.

A row is "poisoned" when its prompt contains POISON (the text) or its request id starts
with `poison`; a pass that holds a poisoned row raises, the way a CUDA error, a NaN
assert or an OOM raises for a whole batch.
"""

from __future__ import annotations

from typing import Any

from twinserve.engine.runner import Runner, RunnerOutput
from twinserve.engine.scheduler import SlotMove
from twinserve.engine.state import RequestState

POISON = "poison"


def is_poisoned(row: RequestState) -> bool:
    prompt = row.request.prompt or ""
    return row.request_id.startswith(POISON) or POISON in prompt


class FaultyRunner:
    """Delegates to `inner`; raises when a pass holds a poisoned row (at `phase`), or always."""

    def __init__(self, inner: Runner, *, phase: str = "any", always: bool = False) -> None:
        self.inner = inner
        self.phase = phase  # "prefill", "decode" or "any"
        self.always = always
        self.failed_passes = 0
        self.passes: list[int] = []  # rows per pass, to see the row-by-row retry

    def execute(self, rows: list[RequestState], *, prefill: bool) -> RunnerOutput:
        self.passes.append(len(rows))
        phase_hit = self.phase == "any" or (self.phase == "prefill") == prefill
        if self.always or (phase_hit and any(is_poisoned(r) for r in rows)):
            self.failed_passes += 1
            raise RuntimeError("CUDA error: device-side assert triggered (injected)")
        return self.inner.execute(rows, prefill=prefill)

    def prepare_cache(self, slots: int, capacity: int, live_slots: int) -> None:
        self.inner.prepare_cache(slots, capacity, live_slots)

    def move_slot(self, move: SlotMove) -> None:
        self.inner.move_slot(move)

    def release_cache(self) -> None:
        self.inner.release_cache()

    def cached_prefix_len(self, state: RequestState) -> int:
        return self.inner.cached_prefix_len(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def install(mode: str) -> None:
    """Wrap the runner of every engine this process builds (`mode`: always | prefill | decode)."""
    from twinserve.engine import factory

    real = factory.build_engine

    def build(config: Any, *, warmup: bool = True) -> Any:
        engine = real(config, warmup=warmup)
        if mode == "always":
            engine.runner = FaultyRunner(engine.runner, always=True)
        else:
            engine.runner = FaultyRunner(engine.runner, phase=mode)
        return engine

    factory.build_engine = build


def fault_env(mode: str) -> dict[str, str]:
    """Environment for a child process whose engines get a FaultyRunner."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(repo / "tests" / "fault_site"), str(repo), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, "TWINSERVE_TEST_FAULTS": mode}
