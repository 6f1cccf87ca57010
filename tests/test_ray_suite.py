"""Runs `tests/ray/` inside `unshare -n`: Ray's processes bind gRPC and its proxies on every
interface, so its tests run in a network namespace with only loopback (nothing reachable from
outside, nothing outside reachable). The suite is its own pytest run there; its output is
printed here, and this test fails when any test in it does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.needs import missing_tool

_NETNS_ENV = "TWINSERVE_RAY_NETNS"


def _unshare_permitted() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def test_the_ray_suite_passes_in_a_loopback_only_network() -> None:
    if os.environ.get(_NETNS_ENV) == "1":
        pytest.skip("already inside the namespace")
    if not _unshare_permitted():
        pytest.skip(
            "`unshare -n` is not permitted here, and Ray's tests run only in a loopback-only namespace"
        )
    try:
        import ray  # noqa: F401
    except ImportError:
        missing_tool("the [ray] extra is not installed")
    up_lo = "ip link set lo up" if shutil.which("ip") else "ifconfig lo up"
    suite = f"{up_lo} && exec {sys.executable} -m pytest -p no:xdist -p no:cacheprovider -q -ra tests/ray"
    env = {**os.environ, _NETNS_ENV: "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", suite],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"the Ray suite failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}"
    assert " passed" in proc.stdout, "the Ray suite ran no test"
