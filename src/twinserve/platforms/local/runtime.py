"""What a control plane needs from whatever runs replicas: local processes, Ray Serve, SageMaker.

The control plane decides (how many replicas of which variant, when to drain); a runtime only
starts, probes, stops and finds replicas. Everything a runtime learns about a replica goes
into a `ReplicaRecord`, so a control plane restarted after a crash can `find_replicas` again.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from twinserve.deploy.spec import EndpointConfig, ReplicaRecord, VariantConfig
from twinserve.errors import ModelLoadError


class ReplicaStartError(ModelLoadError):
    """A replica did not become healthy within the startup timeout (or exited); carries its log tail."""

    error_type = "replica_start"

    def __init__(self, message: str, *, record: ReplicaRecord, log_tail: str, killed: bool = False) -> None:
        super().__init__(f"{message}\n--- last log lines of {record.id} ---\n{log_tail}")
        self.record = record
        self.log_tail = log_tail
        # killed by a signal from outside the control plane while it loaded (the OOM killer, a
        # stray kill): worth one more try, unlike a load that fails on its own
        self.killed = killed


@runtime_checkable
class Runtime(Protocol):
    """Runs the replicas of endpoints. Implementations persist records so they outlive the caller."""

    def start_replica(
        self, endpoint: EndpointConfig, variant: VariantConfig, *, generation: int = 1
    ) -> ReplicaRecord:
        """Start one replica of `variant` (for config `generation`) and block until it is healthy.

        Takes the config (not the stored Endpoint) so a blue/green update can start replicas of
        the target config before it is the endpoint's. Raises ReplicaStartError (with the log
        tail) if it exits or is not healthy within `endpoint.startup_timeout_s`; nothing is left
        running then.
        """
        ...

    def stop_replica(self, record: ReplicaRecord, drain_timeout: float) -> None:
        """Drain (finish in-flight requests for up to `drain_timeout` s), then force; idempotent."""
        ...

    def replica_alive(self, record: ReplicaRecord) -> bool:
        """The replica's process is the one recorded and its `/health` answers 200."""
        ...

    def replica_logs(self, record: ReplicaRecord, lines: int = 100) -> str:
        """The last `lines` lines of the replica's output."""
        ...

    def find_replicas(self, endpoint_name: str) -> list[ReplicaRecord]:
        """The endpoint's replicas with their state as seen now (STOPPED for those gone)."""
        ...
