"""One Ray cluster for the whole Ray suite (which runs inside `unshare -n`, see
tests/test_ray_suite.py): started by this pytest process as a Ray driver, so other drivers
(the CLI in a subprocess) join it at `address`, and shutting the driver down stops it all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class RayCluster:
    address: str
    """The cluster's GCS address (HOST:PORT): what `--ray-address` takes."""
    temp_dir: str


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    import ray

    if os.environ.get("TWINSERVE_RAY_NETNS") != "1":
        pytest.skip("Ray tests run inside `unshare -n` (tests/test_ray_suite.py)")
    # short: Ray's unix sockets live under it, and their paths are limited to ~107 bytes
    temp_dir = tempfile.mkdtemp(prefix="tsr-", dir="/tmp")
    # Serve's processes inherit these: autoscaling metrics every 0.5 s instead of 10 s, and a
    # replica that cannot be scheduled is reported after 2 s instead of 30 s
    os.environ.update(
        {
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_SLOW_STARTUP_WARNING_S": "2",
            "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "1",
        }
    )
    ray.init(
        num_cpus=8,  # logical: the tiny model's replicas reserve 1 each, the machine has 2 cores
        include_dashboard=False,
        namespace="twinserve",
        log_to_driver=False,
        _temp_dir=temp_dir,
    )
    try:
        yield RayCluster(address=ray.get_runtime_context().gcs_address, temp_dir=temp_dir)
    finally:
        ray.shutdown()
