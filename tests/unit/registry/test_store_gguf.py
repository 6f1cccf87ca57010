"""Import from a GGUF file: a tiny random Llama written with the `gguf` package in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.factories import tiny_tokenizer
from tests.gguf_reference import assert_same_tensors, reference_state_dict
from twinserve.errors import ModelLoadError, NotFoundError
from twinserve.registry.store import ModelRegistry

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16


def tiny_gguf(path: Path) -> Path:
    """A Llama GGUF (f32, random) with the tests' byte-level BPE tokenizer as a `gpt2` vocab."""
    import gguf

    tok = tiny_tokenizer()
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    special = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (len(vocab), HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "output.weight": (len(vocab), HIDDEN),
    }
    for b in range(LAYERS):
        shapes |= {
            f"blk.{b}.attn_norm.weight": (HIDDEN,),
            f"blk.{b}.ffn_norm.weight": (HIDDEN,),
            f"blk.{b}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"blk.{b}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{b}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{b}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"blk.{b}.ffn_gate.weight": (INTERMEDIATE, HIDDEN),
            f"blk.{b}.ffn_up.weight": (INTERMEDIATE, HIDDEN),
            f"blk.{b}.ffn_down.weight": (HIDDEN, INTERMEDIATE),
        }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_import_gguf_converts_and_registers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINSERVE_HOME", str(tmp_path / "home"))
    gguf_path = tiny_gguf(tmp_path / "tiny.gguf")
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    info = registry.import_gguf("from-gguf", gguf_path)
    assert info.origin == f"gguf:{gguf_path}" and info.manifest.weights == ["model.safetensors"]
    resolved = registry.resolve("models:/from-gguf/1")
    config = json.loads((resolved.path / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS and "quantization_config" not in config
    assert (resolved.path / "tokenizer.json").is_file()
    assert not list((tmp_path / "home" / "registry" / "tmp").glob("gguf-*"))  # conversion folder removed
    # the registered weights are the GGUF's, tensor by tensor, as transformers reads them
    written = load_file(resolved.path / "model.safetensors")
    reference = reference_state_dict(gguf_path)
    assert len(written) == len(reference) == 3 + 9 * LAYERS  # untied: lm_head saved on its own
    assert_same_tensors(written, reference)


def test_bad_gguf_files(tmp_path: Path) -> None:
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(NotFoundError, match="GGUF file not found"):
        registry.import_gguf("from-gguf", tmp_path / "missing.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="cannot load GGUF"):
        registry.import_gguf("from-gguf", garbage)
    assert registry.list_models() == []
