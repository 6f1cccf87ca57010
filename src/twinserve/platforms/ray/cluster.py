"""Reaching a Ray cluster: the `[ray]` extra, a driver connection that fails in seconds, Serve.

Every twinserve command is a short-lived Ray driver: it connects, asks Serve (or Ray Data) to
do something, and leaves. Serve applications are owned by Serve's controller (a detached
actor), so they keep running after the driver is gone.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from twinserve.deploy.platform_config import RaySettings
from twinserve.errors import UnreachableError, ValidationError

log = logging.getLogger(__name__)

# A cluster that does not answer its port within this is unreachable, not slow.
_CONNECT_TIMEOUT_S = 3.0
RAY_NAMESPACE = "twinserve"


def require_ray() -> Any:
    """The `ray` module with Serve and Data, or a ValidationError naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401  (the batch transform's engine)
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise ValidationError(
            "the ray platform needs Ray Serve and Ray Data: pip install 'twinserve[ray]'",
            param="platform",
        ) from exc
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of an explicit address, None for `auto`."""
    if address == "auto":
        return None
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    if parts.hostname is None or parts.port is None:
        raise ValidationError(
            f"ray address {address!r} is not auto, HOST:PORT or ray://HOST:PORT", param="ray_address"
        )
    return parts.hostname, parts.port


def check_reachable(address: str) -> None:
    """Fail within seconds when nothing listens at `address` (ray.init would retry for a minute)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UnreachableError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` or pass --ray-address"
        ) from exc


@contextmanager
def connected(settings: RaySettings) -> Iterator[Any]:
    """A driver connection to the cluster for the duration of the block; yields `ray`.

    Re-entrant: an already connected driver (a test, a notebook) is used as it is and left
    connected.
    """
    ray = require_ray()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one INFO line per call otherwise
    # Ray warns on every connection that token auth is on: it is, and docs/ray.md says so
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if ray.is_initialized():
        yield ray
        return
    check_reachable(settings.address)
    _use_the_clusters_token()
    try:
        ray.init(
            address=settings.address,
            namespace=RAY_NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    except ConnectionError as exc:  # `auto` with no cluster on this machine
        raise UnreachableError(
            f"no Ray cluster at {settings.address}: {exc}; start one with `ray start --head`"
        ) from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def _use_the_clusters_token() -> None:
    """Send the token `ray start` left in ~/.ray/auth_token (or $RAY_AUTH_TOKEN): Ray's driver
    does so by itself only for `auto`, and a token-auth cluster refuses an explicit HOST:PORT
    without it. RAY_AUTH_MODE, when set, decides as in Ray."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def start_serve(settings: RaySettings) -> None:
    """Start Serve's controller and proxies when they are not running (a running Serve keeps its
    own HTTP options: the proxy address belongs to the cluster, not to one endpoint)."""
    from ray import serve

    if serve_details() is not None:
        return
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})


def serve_details() -> dict[str, Any] | None:
    """Serve's whole state (applications, deployments, replicas, proxies, HTTP options), as
    `serve status` reads it; None when Serve is not running in the cluster."""
    from ray.exceptions import RayActorError
    from ray.serve.context import _get_global_client, _set_global_client
    from ray.serve.exceptions import RayServeException

    for _ in range(2):
        try:
            client = _get_global_client(raise_if_no_controller_running=True)
        except RayServeException:
            return None
        if client is None:
            return None
        try:
            details: dict[str, Any] = client.get_serve_details()
            return details
        except RayActorError:  # another driver shut Serve down: forget the dead controller, look again
            _set_global_client(None)
    return None


def proxy_base_url(settings: RaySettings, details: dict[str, Any]) -> str:
    """Where clients reach Serve's proxy: the configured public URL, else the proxy's own
    host and port (a wildcard host is reached on the cluster's address)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    http = details.get("http_options") or {}
    host = str(http.get("host") or settings.http_host)
    port = int(http.get("port") or settings.http_port)
    if host in ("0.0.0.0", "::", ""):
        target = _host_port(settings.address)
        host = target[0] if target is not None else "127.0.0.1"
    return f"http://{host}:{port}"


# who a process is, not where models are: never copied to a replica
_NOT_FOR_REPLICAS = (
    "TWINSERVE_API_KEY",
    "TWINSERVE_REPLICA_ID",
    "TWINSERVE_ENDPOINT",
    "TWINSERVE_ENDPOINT_STATE",
)
_MODEL_ACCESS = ("MLFLOW_TRACKING_URI", "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT")


def replica_env() -> dict[str, str]:
    """The driver's twinserve settings a replica needs to resolve `models:/` as `create` pinned it
    (the registry's store and artifacts, the cache, the Hub). Sent as constructor arguments, never
    as a runtime_env, which Serve shows to anyone who can read its config (a registry URI may hold
    a password). Cloud credentials are not sent: nodes use their own (an instance role)."""
    return {
        name: value
        for name, value in os.environ.items()
        if (name.startswith("TWINSERVE_") and name not in _NOT_FOR_REPLICAS) or name in _MODEL_ACCESS
    }
