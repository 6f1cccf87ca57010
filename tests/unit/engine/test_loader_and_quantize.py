"""Loading rules (safetensors only, dtype choice) and the quantized linear paths on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.factories import engine_config
from twinserve.engine.factory import build_engine
from twinserve.engine.layers import INT4_GROUP, DynamicInt8Linear, Int4Linear, PackedBf16Linear, make_linear
from twinserve.engine.loader import hash_weights, load_model, resolve_dtype, safetensors_files
from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.errors import ModelLoadError, NotFoundError


def test_pickle_only_checkpoints_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(engine_config(folder))


def test_missing_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_model(engine_config(tmp_path / "nope"))


def test_unsupported_architecture_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, folder)
    cfg = (folder / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gpt2"')
    (folder / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError):
        load_model(engine_config(folder))


def test_weights_are_hashed_unless_their_hash_is_given(tiny_model_dir: Path) -> None:
    computed = load_model(engine_config(tiny_model_dir)).weights_sha256
    assert computed == hash_weights(safetensors_files(tiny_model_dir))
    # a registry version's hash, verified on resolve, is reported as given: not hashed again
    given = "ab" * 32
    assert load_model(engine_config(tiny_model_dir, weights_sha256=given)).weights_sha256 == given


def test_auto_dtype_is_a_real_dtype() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32


def _relative_error(linear, weight: torch.Tensor, x: torch.Tensor) -> float:
    ref = x.float() @ weight.float().T
    return float((linear(x).float() - ref).norm() / ref.norm())


def test_int8_linear_is_close_to_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g), torch.randn(5, 64, generator=g)
    assert isinstance(make_linear(w, None, quantize="int8", dtype=torch.float32), DynamicInt8Linear)
    assert _relative_error(DynamicInt8Linear(w, None), w, x) < 0.02


def _q4_1_grid(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Weights that are exactly 4-bit in every group of 32 (as a Q4_1 GGUF dequantizes to)."""
    q = torch.randint(0, 16, (rows, cols // INT4_GROUP, INT4_GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans its whole grid, as min/max quantizing leaves it
    scale = torch.rand(rows, cols // INT4_GROUP, 1, generator=g).bfloat16().float() * 0.1 + 0.01
    low = torch.randn(rows, cols // INT4_GROUP, 1, generator=g).bfloat16().float() * 0.1
    return (q * scale + low).reshape(rows, cols)


def test_int4_linear_is_near_fp32_and_recovers_a_4_bit_grid() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g), torch.randn(5, 64, generator=g).bfloat16()
    assert isinstance(make_linear(w, None, quantize="int4", dtype=torch.bfloat16), Int4Linear)
    # 16 levels per group of a Gaussian: ~8% error, what llama.cpp's Q4_1 has
    assert _relative_error(Int4Linear(w, None, dtype=torch.bfloat16), w, x) < 0.12
    # weights already on a 4-bit grid come back up to the bf16 rounding of scale and minimum
    grid = _q4_1_grid(96, 64, g)
    assert _relative_error(Int4Linear(grid, None, dtype=torch.bfloat16), grid, x) < 0.02


def test_int4_linear_pads_odd_output_sizes_and_adds_its_bias() -> None:
    g = torch.Generator().manual_seed(1)
    w, b = _q4_1_grid(50, 96, g), torch.randn(50, generator=g)
    x = torch.randn(2, 3, 96, generator=g).bfloat16()  # any leading shape
    y = Int4Linear(w, b, dtype=torch.bfloat16)(x)
    assert y.shape == (2, 3, 50)
    ref = x.float() @ w.T + b
    assert float((y.float() - ref).norm() / ref.norm()) < 0.02
    # a strided input (a chunk of a wider tensor) is the same input
    wide = torch.cat([x, x], dim=-1)[..., :96]
    assert torch.equal(Int4Linear(w, b, dtype=torch.bfloat16)(wide), y)


def test_int4_refuses_input_sizes_off_its_groups() -> None:
    with pytest.raises(ModelLoadError, match="divisible by 32"):
        Int4Linear(torch.randn(16, 48), None, dtype=torch.bfloat16)


@pytest.mark.skipif(not PackedBf16Linear.supported(), reason="no oneDNN bf16 on this CPU")
def test_packed_bf16_linear_matches_plain_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(3, 64, generator=g).bfloat16()
    ref = torch.nn.functional.linear(x, w)
    assert torch.allclose(PackedBf16Linear(w, None)(x).float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("quantize", ["int8", "int4", "bitsandbytes", "bitsandbytes-nf4"])
def test_quantized_engines_generate(quantize: str, tiny_model_dir: Path) -> None:
    # bitsandbytes is in the [dev] extra: a missing one fails here, it does not skip
    engine = build_engine(engine_config(tiny_model_dir, dtype="auto", quantize=quantize))
    state = engine.add_request(
        GenerateRequest(
            prompt="hello world", params=SamplingParams(max_new_tokens=6, ignore_eos=True, details=True)
        )
    )
    events = []
    while engine.has_work():
        events += engine.step()
    final = events[-1]
    assert state.status.is_finished and final.details is not None
    assert final.details.generated_tokens == 6
    assert all(t.logprob is not None and t.logprob <= 0.0 for t in final.details.tokens)
