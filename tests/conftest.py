"""Shared fixtures: one persistent twinserve home for the whole run, the default model, the tiny
model, and a local platform under tmp_path (`manager`).

The home persists between runs (`.cache/test-home`, or TWINSERVE_TEST_HOME) so the default
model is downloaded and converted once per machine, not once per test run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from twinserve.platforms.local.platform import LocalPlatform

REPO_ROOT = Path(__file__).resolve().parent.parent

# One torch thread per test process (pytest workers and the servers they start inherit it; an
# engine given num_threads still takes that many): two xdist workers and their servers share
# 2 cores, and torch ops on more threads than free cores pay futex wake-ups (docs/engine.md) that
# made CPU-heavy tests take 3x longer beside the Ray suite.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ray's tests run only inside a loopback-only network namespace, as their own pytest run
# (tests/test_ray_suite.py starts it with TWINSERVE_RAY_NETNS=1)
collect_ignore = [] if os.environ.get("TWINSERVE_RAY_NETNS") == "1" else ["ray"]


def _test_home() -> Path:
    configured = os.environ.get("TWINSERVE_TEST_HOME")
    return Path(configured).expanduser().resolve() if configured else REPO_ROOT / ".cache" / "test-home"


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated here so a run with another config still knows them.
    config.addinivalue_line("markers", "integration: uses the real default model")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped where none is available")


# The longest files first (seconds each on 2 cores, 2026-12-02): two xdist workers take files in
# this order (`make test` passes --no-loadscope-reorder, else xdist puts the files with the most
# tests first), and a long file taken last runs alone at the end: the one-test Ray suite did,
# adding 3 minutes. The rest keep their collection order.
SLOW_FILES_FIRST = (
    "tests/test_ray_suite.py",  # ~220 s beside the rest (~110 s alone: make test-ray)
    "tests/chaos/test_endpoint_chaos.py",  # ~110 s alone (20 kills, each healed)
    "tests/unit/platforms/local/test_operations.py",  # ~200 s
    "tests/unit/platforms/local/test_async_endpoint.py",  # ~100 s
    "tests/integration/test_rag_default_model.py",  # ~100 s
    "tests/chaos/test_async_chaos.py",  # ~75 s
    "tests/unit/platforms/local/test_endpoint_cli.py",  # ~70 s
    "tests/integration/test_endpoint_default_model.py",  # ~60 s
    "tests/integration/test_registry_default.py",  # ~55 s
    "tests/unit/platforms/local/test_up_signals.py",  # ~50 s
)


def _slow_rank(item: pytest.Item) -> int:
    path = item.path.relative_to(REPO_ROOT).as_posix()
    return SLOW_FILES_FIRST.index(path) if path in SLOW_FILES_FIRST else len(SLOW_FILES_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_slow_rank)  # stable: within a file and among the rest, collection order
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # don't pay for importing torch
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def test_home() -> Path:
    """The persistent TWINSERVE_HOME of the test run."""
    home = _test_home()
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session", autouse=True)
def _twinserve_home(test_home: Path) -> Iterator[None]:
    # Keep every test away from the user's real ~/.cache/twinserve.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWINSERVE_HOME", str(test_home))
        mp.delenv("TWINSERVE_DEFAULT_MODEL_WHEEL", raising=False)
        yield


@pytest.fixture(scope="session")
def default_model_path(_twinserve_home: None) -> Path:
    """Folder of the real default model (SmolLM2-135M-Instruct), built once per machine."""
    from twinserve.registry.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (fp32 safetensors) with a byte-level BPE tokenizer."""
    from tests.factories import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalPlatform]:
    """A local platform with its own state store and home under tmp_path; whatever failed, no
    endpoint (and so no process) outlives the test."""
    from twinserve.deploy.state import StateStore
    from twinserve.platforms.local.local_runtime import LocalRuntime
    from twinserve.platforms.local.platform import LocalPlatform

    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path))
    store = StateStore(tmp_path / "endpoints" / "state.db")
    platform = LocalPlatform(store, LocalRuntime(store, home=tmp_path))
    try:
        yield platform
    finally:
        for endpoint in store.list_endpoints():
            platform.delete(endpoint.name)
