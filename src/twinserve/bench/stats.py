"""Latency statistics of a serving benchmark: percentiles, TPOT, ITL and goodput.

Definitions follow vLLM's `benchmark_serving` so numbers compare across tools:
- TTFT: request sent → first chunk received.
- TPOT: (E2E latency − TTFT) / (output tokens − 1); undefined for a single token.
- ITL: every gap between two consecutive chunks of one request.
- Goodput: completed requests per second that met every given SLO.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Distribution(BaseModel):
    """Summary of one latency, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Distribution | None:
        """None when there is nothing to summarise (e.g. TPOT of one-token answers)."""
        if not seconds:
            return None
        ms = [s * 1000 for s in seconds]
        return cls(
            count=len(ms),
            mean=sum(ms) / len(ms),
            p50=percentile(ms, 50),
            p90=percentile(ms, 90),
            p99=percentile(ms, 99),
        )


def tpot(latency: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first (seconds)."""
    if output_tokens <= 1:
        return None
    return (latency - ttft) / (output_tokens - 1)


def itls(chunk_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive chunk arrival times (seconds)."""
    return [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]


class Slo(BaseModel):
    """Service-level objectives for goodput, in milliseconds; unset ones are not checked."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float | None = Field(None, gt=0, description="Time to first token at most this.")
    tpot_ms: float | None = Field(None, gt=0, description="Time per output token at most this.")
    e2e_ms: float | None = Field(None, gt=0, description="Whole-request latency at most this.")

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`"ttft_ms=500,tpot_ms=50"` → Slo (the CLI's `--slo`)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in re.split(r"[,\s]+", text))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"SLO {part!r} is not NAME=MILLISECONDS")
            values[name.strip()] = float(value)
        return cls.model_validate(values)

    def met(self, ttft: float, tpot_s: float | None, latency: float) -> bool:
        """Did a request (times in seconds) meet every objective? A missing TPOT meets it."""
        if self.ttft_ms is not None and ttft * 1000 > self.ttft_ms:
            return False
        if self.tpot_ms is not None and tpot_s is not None and tpot_s * 1000 > self.tpot_ms:
            return False
        return not (self.e2e_ms is not None and latency * 1000 > self.e2e_ms)
