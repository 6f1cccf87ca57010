"""The endpoint-level seam: what the CLI asks of wherever an endpoint runs.

```
                 ┌── local      processes + our router, controller, reconciler, blue/green by weights
endpoint CLI ──► Platform ──┼── sagemaker  boto3: HF LLM DLC, SageMaker blue/green, Application Auto Scaling
                 └── ray        a Ray Serve application: Serve routes, autoscales, rolls updates
```
A platform owns what it runs (replica processes, a SageMaker endpoint, a Serve app); what is
the same everywhere stays in `deploy/`: the spec, pinning, policies, the state store (every
platform records its endpoints there, so `list` and later commands find them and their
platform), events. Callers read `capabilities` instead of testing which platform it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from twinserve.client.transport import Transport
    from twinserve.deploy.platform_config import PlatformName
    from twinserve.deploy.policies import AutoscalingPolicy
    from twinserve.deploy.spec import Endpoint, EndpointConfig

Progress = Callable[[str], None]
TrafficShifting = Literal["weights", "canary", "all_at_once"]


def quiet(_: str) -> None:
    """The default progress callback: say nothing."""


@dataclass(frozen=True)
class Capabilities:
    """What a platform does natively (so twinserve's own machinery is not needed for it)."""

    native_routing: bool
    """The platform routes requests to replicas itself (no twinserve router)."""
    native_autoscaling: bool
    """The platform applies the autoscaling policy itself (no twinserve controller)."""
    traffic_shifting: frozenset[TrafficShifting]
    """How an update moves traffic: by variant weights, canary steps, or all at once."""
    scale_to_zero: bool
    """A variant may run 0 replicas (async endpoints with a queue)."""
    runtime_api: bool
    """Endpoints answer SageMaker Runtime's API (invoke_endpoint, response streams)."""


@runtime_checkable
class Platform(Protocol):
    """Deploys and runs endpoints. Every method takes the endpoint's name; state is in the store."""

    name: PlatformName
    capabilities: Capabilities

    def create(self, config: EndpointConfig, *, wait: bool = True, progress: Progress = quiet) -> Endpoint:
        """Pin the models, deploy generation 1, return it InService (or raise, cleaned up / Failed)."""
        ...

    def update(
        self,
        name: str,
        target: EndpointConfig,
        *,
        canary_percent: Iterable[float] = (),
        bake_s: float = 0.0,
        progress: Progress = quiet,
    ) -> Endpoint:
        """Roll out the next generation (re-pinned) with no request dropped; roll back on failure."""
        ...

    def scale(
        self, name: str, replicas: int, *, variant: str | None = None, progress: Progress = quiet
    ) -> Endpoint:
        """Set a variant's capacity (within the autoscaling bounds when it has a policy)."""
        ...

    def set_autoscaling(
        self, name: str, policy: AutoscalingPolicy | None, *, progress: Progress = quiet
    ) -> Endpoint:
        """Apply (or, with None, remove) the endpoint's autoscaling policy."""
        ...

    def describe(self, name: str) -> Endpoint:
        """The endpoint as the platform sees it now; NotFoundError."""
        ...

    def logs(self, name: str, lines: int = 50) -> dict[str, str]:
        """The last `lines` of each log source (replica, router, CloudWatch stream …)."""
        ...

    def delete(self, name: str, *, progress: Progress = quiet) -> bool:
        """Remove everything the endpoint runs and forget it; False if none existed (idempotent)."""
        ...

    def transport(self, endpoint: Endpoint) -> Transport:
        """How `LLMClient` reaches the endpoint (its API key included)."""
        ...
