"""Who holds an endpoint's operation: a host, a pid and that process's start time.

A bare pid is not an identity: the OS hands it to another process once its holder is gone
(after a reboot, or within minutes on a busy machine), and a reused pid would hold the endpoint
forever. With the start time, a holder on this host is alive only while a process with that pid,
started at that moment, still runs: a dead holder is known dead at once and its operation can be
taken over without waiting. A holder on another host (a state file on a shared disk) cannot be
probed from here: it is trusted until its lease expires.
"""

from __future__ import annotations

import functools
import os
import socket
from datetime import UTC, datetime, timedelta

import psutil
from pydantic import BaseModel, ConfigDict, Field

# how long a holder on another host is trusted without a probe; on this host the probe decides
LEASE_TTL_S = 3600.0
# psutil derives a start time from the boot time and clock ticks: equal for one process, 10 ms steps
_START_TOLERANCE_S = 0.05


def utcnow() -> datetime:
    return datetime.now(UTC)


@functools.cache
def this_host() -> str:
    return socket.gethostname()


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if it is gone or a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class OperationHolder(BaseModel):
    """The process running an endpoint's operation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(min_length=1, description="Host name of the process.")
    pid: int = Field(ge=1, description="Its pid on that host.")
    started: float | None = Field(
        None, description="Its start time (epoch s); None for a holder recorded before this was kept."
    )
    expires_at: datetime = Field(description="UTC; after this a holder that cannot be probed is dead.")

    @classmethod
    def this_process(cls, ttl_s: float = LEASE_TTL_S) -> OperationHolder:
        pid = os.getpid()
        return cls(
            host=this_host(),
            pid=pid,
            started=process_start_time(pid),
            expires_at=utcnow() + timedelta(seconds=ttl_s),
        )

    def is_this_process(self) -> bool:
        return self.host == this_host() and self.pid == os.getpid() and self._same_start()

    def alive(self) -> bool:
        """Still running: probed on this host; elsewhere, until the lease expires."""
        if self.host != this_host():
            return utcnow() < self.expires_at
        return self._same_start()

    def _same_start(self) -> bool:
        """A process with this pid runs and started when this holder's did."""
        started = process_start_time(self.pid)
        if started is None:
            return False
        return self.started is None or abs(started - self.started) <= _START_TOLERANCE_S

    def describe(self) -> str:
        return f"pid {self.pid}" if self.host == this_host() else f"pid {self.pid} on {self.host}"
