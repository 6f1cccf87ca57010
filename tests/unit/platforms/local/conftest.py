"""Fixtures of the endpoint tests that start real replica, router and controller processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from twinserve.deploy.state import StateStore
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.platform import LocalPlatform


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalPlatform]:
    """A manager with its own state store and home under tmp_path."""
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path))
    store = StateStore(tmp_path / "endpoints" / "state.db")
    manager = LocalPlatform(store, LocalRuntime(store, home=tmp_path))
    try:
        yield manager
    finally:  # whatever failed above, no process outlives the test
        for endpoint in store.list_endpoints():
            manager.delete(endpoint.name)
