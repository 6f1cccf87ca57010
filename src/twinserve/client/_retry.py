"""When to try a request again, and how long to wait first.

Only failures that say "later, or elsewhere" are retried: 429 (overloaded), 503 (loading,
draining, dead engine) and a connection that could not be made (`UnreachableError`,
also 503). A validation error would fail again; a timeout may have been served already.
Waits are exponential with full jitter (AWS architecture blog, "Exponential Backoff
and Jitter") so clients that failed together don't come back together; a server's
`Retry-After` (seconds) is a lower bound, and `backoff_cap` bounds every wait.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from twinserve.errors import TwinserveError

RETRYABLE_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` further attempts after the first; waits in seconds."""

    max_retries: int = 3
    backoff_base: float = 0.25
    backoff_cap: float = 8.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("backoff_base and backoff_cap must be >= 0")

    def should_retry(self, error: TwinserveError, attempt: int) -> bool:
        """`attempt` counts from 0 (the first try)."""
        return attempt < self.max_retries and error.status_code in RETRYABLE_STATUS

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1`."""
        jitter = random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2**attempt))
        if retry_after is not None:
            jitter = max(jitter, retry_after)
        return min(self.backoff_cap, jitter)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` in seconds; None when absent or an HTTP date (not worth a parser here)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
