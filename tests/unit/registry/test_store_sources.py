"""Imports from the Hugging Face cache, concurrent imports from two processes, unreachable stores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.factories import tiny_llama_dir
from twinserve.errors import NotFoundError, UnreachableError, ValidationError
from twinserve.registry.store import ModelRegistry

REPO_ROOT = Path(__file__).resolve().parents[3]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _registry(root: Path) -> ModelRegistry:
    return ModelRegistry(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"))


def _fake_hub_cache(cache: Path, repo_id: str, model: Path) -> None:
    """The huggingface_hub cache layout: blobs, a snapshot of symlinks named by commit, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    _fake_hub_cache(cache, "twin-org/tiny-twin", tiny_llama_dir(tmp_path / "tiny"))
    # huggingface_hub reads its environment at import time: point the live constants here,
    # offline, so the "not cached" case fails at once instead of trying the network
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_import_from_the_local_hub_cache_records_the_commit(hub_cache: Path, tmp_path: Path) -> None:
    registry = _registry(tmp_path / "store")
    info = registry.import_hf("hub-twin", "hf://twin-org/tiny-twin@main")
    assert info.origin == f"hf://twin-org/tiny-twin@{COMMIT}"
    stored = Path(info.source.removeprefix("file://"))
    assert (stored / "config.json").is_file() and not (stored / "config.json").is_symlink()
    assert registry.resolve("models:/hub-twin/1").content_sha256 == info.content_sha256
    pinned = registry.import_hf("hub-twin", f"twin-org/tiny-twin@{COMMIT}", force=True)
    assert pinned.origin == info.origin


def test_a_repo_neither_cached_nor_reachable_is_a_clear_error(hub_cache: Path, tmp_path: Path) -> None:
    registry = _registry(tmp_path / "store")
    with pytest.raises(
        NotFoundError, match=r"twin-org/missing@main is neither in the local Hugging Face cache"
    ):
        registry.import_hf("hub-twin", "hf://twin-org/missing")
    with pytest.raises(ValidationError, match="bad Hub reference"):
        registry.import_hf("hub-twin", "hf://just-a-name")


def test_two_processes_importing_into_one_new_store(tmp_path: Path) -> None:
    models = [tiny_llama_dir(tmp_path / f"m{seed}", seed=seed) for seed in range(4)]
    store = tmp_path / "store"
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from twinserve.registry.store import ModelRegistry
        registry = ModelRegistry(sys.argv[1], sys.argv[2])
        for folder in sys.argv[3:]:
            print(registry.import_model("shared", Path(folder)).version)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'src'}{os.pathsep}{REPO_ROOT}"}
    args = [f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts")]
    # both start on a store that does not exist yet: its creation is contended too
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args, *map(str, pair)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pair in (models[:2], models[2:])
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr
    reported = sorted(int(line) for stdout, _ in outputs for line in stdout.split())
    assert reported == [1, 2, 3, 4]
    registry = _registry(store)
    versions = registry.list_versions("shared")
    assert sorted(v.version for v in versions) == [1, 2, 3, 4]
    assert len({v.content_sha256 for v in versions}) == 4
    for v in versions:  # every version's files are whole
        registry.resolve(f"models:/shared/{v.version}")
    assert len(registry.client.search_experiments()) == 2  # MLflow's Default and ours, once


def test_unreachable_stores_are_clear_errors(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    registry = ModelRegistry(f"postgresql://twin:secret@127.0.0.1:{port}/registry", str(tmp_path))
    with pytest.raises(UnreachableError) as info:
        registry.list_models()
    message = info.value.message
    assert f"127.0.0.1:{port}" in message and "is unreachable" in message and "secret" not in message
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UnreachableError, match="is unreachable"):
        ModelRegistry(f"sqlite:///{blocker / 'mlflow.db'}").list_models()
    with pytest.raises(ValidationError, match="needs a file"):
        ModelRegistry("sqlite:///:memory:")
