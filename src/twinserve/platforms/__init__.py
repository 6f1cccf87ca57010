"""Where endpoints run: `local` (processes + router on this machine), `sagemaker` (boto3) and
`ray` (a Ray Serve application).

`get_platform` builds one by name; `platform_of` finds the one an endpoint was created on (its
config records it), so only `create` needs `--platform`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twinserve.deploy.platform import Platform
    from twinserve.deploy.platform_config import PlatformName
    from twinserve.deploy.state import StateStore

PLATFORMS: tuple[PlatformName, ...] = ("local", "sagemaker", "ray")


def get_platform(name: PlatformName, store: StateStore | None = None) -> Platform:
    """The platform `name` over `store` (default: the state store under TWINSERVE_HOME)."""
    from twinserve.deploy.state import StateStore

    store = store or StateStore()
    if name == "local":
        from twinserve.platforms.local.platform import LocalPlatform

        return LocalPlatform(store)
    if name == "sagemaker":
        from twinserve.platforms.sagemaker.platform import SageMakerPlatform

        return SageMakerPlatform(store)
    if name == "ray":
        from twinserve.platforms.ray.platform import RayPlatform

        return RayPlatform(store)
    raise ValueError(f"unknown platform {name!r}; one of {', '.join(PLATFORMS)}")


def platform_of(endpoint: str, store: StateStore | None = None) -> Platform:
    """The platform endpoint `endpoint` runs on; NotFoundError when there is no such endpoint."""
    from twinserve.deploy.state import StateStore

    store = store or StateStore()
    return get_platform(store.get_endpoint(endpoint).config.platform.type, store)
