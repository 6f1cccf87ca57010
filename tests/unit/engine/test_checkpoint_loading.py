"""Loading sharded checkpoints well: each shard read once, per-tensor conversion, clear errors.

A checkpoint the engine would run wrongly (a config setting it does not implement, tensors
it would ignore, shapes the config does not imply, shards that disagree with their index)
must fail at load with a message naming the problem, never serve wrong tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.factories import engine_config, family_model_dir
from twinserve.engine import loader
from twinserve.engine.loader import load_model
from twinserve.errors import ModelLoadError

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return family_model_dir(tmp_path_factory.mktemp("sharded"), "llama2")


@pytest.fixture
def checkpoint(sharded: Path, tmp_path: Path) -> Path:
    """A copy of the sharded checkpoint that the test may break."""
    return Path(shutil.copytree(sharded, tmp_path / "model"))


def weight_map(path: Path) -> dict[str, str]:
    return dict(json.loads((path / INDEX).read_text())["weight_map"])


def rewrite_index(path: Path, edit: Callable[[dict[str, str]], None]) -> None:
    index = json.loads((path / INDEX).read_text())
    edit(index["weight_map"])
    (path / INDEX).write_text(json.dumps(index))


def rewrite_shard(path: Path, shard: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / shard)
    edit(tensors)
    save_file(tensors, path / shard, metadata={"format": "pt"})


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_each_shard_is_opened_once(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: Counter[str] = Counter()
    real_safe_open = loader.safe_open

    def counting_safe_open(filename: str, *args: Any, **kwargs: Any) -> Any:
        opened[Path(filename).name] += 1
        return real_safe_open(filename, *args, **kwargs)

    monkeypatch.setattr(loader, "safe_open", counting_safe_open)
    load_model(engine_config(sharded))
    shards = set(weight_map(sharded).values())
    assert len(shards) >= 3
    assert opened == Counter(dict.fromkeys(shards, 1))


def test_tensors_are_converted_as_they_are_read(sharded: Path) -> None:
    files = loader.safetensors_files(sharded)
    weights = loader.read_tensors(files, dtype=torch.bfloat16)
    assert set(weights) == set(weight_map(sharded))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    reference = loader.read_tensors(files)  # the checkpoint's own fp32
    assert all(torch.equal(weights[n], reference[n].to(torch.bfloat16)) for n in reference)


def test_a_missing_shard_is_a_clear_error(checkpoint: Path) -> None:
    shard = sorted(set(weight_map(checkpoint).values()))[1]
    (checkpoint / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"shards missing.*{shard}"):
        load_model(engine_config(checkpoint))


def test_a_shard_that_disagrees_with_the_index_is_a_clear_error(checkpoint: Path) -> None:
    shards = sorted(set(weight_map(checkpoint).values()))
    name = next(n for n, s in weight_map(checkpoint).items() if s == shards[0])

    def move(wm: dict[str, str]) -> None:
        wm[name] = shards[1]  # the index now says the tensor is elsewhere

    rewrite_index(checkpoint, move)
    with pytest.raises(ModelLoadError, match=f"disagrees with {INDEX}") as info:
        load_model(engine_config(checkpoint))
    assert name in str(info.value)


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(checkpoint: Path, shard: str) -> None:
    name = next(iter(weight_map(checkpoint)))
    rewrite_index(checkpoint, lambda wm: wm.update({name: shard}))
    with pytest.raises(ModelLoadError, match="is not a file name in"):
        load_model(engine_config(checkpoint))


def test_a_tensor_in_two_shards_is_a_clear_error(checkpoint: Path) -> None:
    wm = weight_map(checkpoint)
    shards = sorted(set(wm.values()))
    name, home = next((n, s) for n, s in wm.items() if s != shards[-1])
    duplicate = load_file(checkpoint / home)[name]
    rewrite_shard(checkpoint, shards[-1], lambda t: t.update({name: duplicate}))
    # an index cannot name two shards for one tensor: without it, the shards alone are read
    (checkpoint / INDEX).unlink()
    with pytest.raises(ModelLoadError, match=f"{name!r} is in more than one shard"):
        load_model(engine_config(checkpoint))


def test_shapes_the_config_does_not_imply_are_a_clear_error(checkpoint: Path) -> None:
    edit_config(checkpoint, intermediate_size=96)
    with pytest.raises(
        ModelLoadError, match=r"gate_proj.weight' has shape \(128, 64\), the config implies \(96, 64\)"
    ):
        load_model(engine_config(checkpoint))


def test_weights_the_forward_pass_would_ignore_are_refused(checkpoint: Path) -> None:
    shard = weight_map(checkpoint)["model.layers.0.mlp.down_proj.weight"]
    name = "model.layers.0.mlp.down_proj.bias"
    rewrite_shard(checkpoint, shard, lambda t: t.update({name: torch.ones(64)}))
    rewrite_index(checkpoint, lambda wm: wm.update({name: shard}))
    with pytest.raises(ModelLoadError, match=f"would ignore \\({name}\\)"):
        load_model(engine_config(checkpoint))


def test_an_untied_checkpoint_without_its_lm_head_is_refused(checkpoint: Path) -> None:
    shard = weight_map(checkpoint)["lm_head.weight"]
    rewrite_shard(checkpoint, shard, lambda t: t.pop("lm_head.weight"))
    rewrite_index(checkpoint, lambda wm: wm.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="lm_head.weight' missing and tie_word_embeddings is false"):
        load_model(engine_config(checkpoint))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type 'dynamic'",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 256,
                }
            },
            "rope_type 'longrope'",
        ),
        ({"layer_types": ["full_attention", "chunked_attention"]}, "layer type 'chunked_attention'"),
        ({"layer_types": ["full_attention"]}, "layer_types names 1 layers"),
        ({"sliding_window": 0}, "sliding_window 0"),
    ],
)
def test_unsupported_settings_are_load_errors_naming_them(
    checkpoint: Path, changes: dict[str, Any], named: str
) -> None:
    edit_config(checkpoint, **changes)
    with pytest.raises(ModelLoadError) as info:
        load_model(engine_config(checkpoint))
    assert named in str(info.value)


_PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    # everything load_model imports, so that only loading the weights is measured
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from twinserve.config import EngineConfig
    from twinserve.engine.loader import load_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    cfg = EngineConfig(model=sys.argv[1], dtype="bfloat16")
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    loaded = load_model(cfg)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)


def test_sharded_bf16_load_peaks_at_the_model_plus_one_shard(tmp_path: Path) -> None:
    """A ≥ 200 MB fp32 checkpoint in 6+ shards, loaded as bf16: no full fp32 copy is ever held."""
    path = family_model_dir(
        tmp_path / "big",
        "llama2",
        max_shard_size="40MB",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
    )
    files = loader.safetensors_files(path)
    checkpoint_bytes = sum(f.stat().st_size for f in files)
    largest_shard = max(f.stat().st_size for f in files)
    assert checkpoint_bytes >= 200 * 2**20 and len(files) >= 5
    model_bytes = checkpoint_bytes // 2  # fp32 → bf16
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    grown = measured["peak"] - measured["before"]
    slack = 24 * 2**20  # allocator rounding, one layer's transient fused and packed copies
    assert grown <= model_bytes + largest_shard + slack, (
        f"peak grew {grown / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model "
        f"with {largest_shard / 2**20:.0f} MiB shards (checkpoint {checkpoint_bytes / 2**20:.0f} MiB)"
    )
