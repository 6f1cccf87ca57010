"""Every architecture the engine serves, from a sharded checkpoint, against transformers in fp32.

Each family is a tiny random model of that config saved in ≥ 3 shards with an index, so a
green run proves what users deploy: Llama 2, Llama 3.1's `llama3` RoPE scaling, Mistral's
sliding window (prompts and generations longer than it), Qwen2's q/k/v biases with the LM
head tied and untied, and Qwen2's mix of full and sliding layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests.engine_driver import built_from, greedy, hf_greedy, run, token_ids
from tests.factories import FAMILIES, engine_config, family_model_dir
from twinserve.engine.factory import build_engine
from twinserve.engine.loader import load_model
from twinserve.engine.models.architecture import ModelShape
from twinserve.engine.models.checkpoint_config import read_checkpoint_config

# the first three share a 30-token prefix: batched alone they take the shared-prefix prefill
PREFIX = "once upon a time there was a dragon and a knight, to be or not to be, that is the question of"
PROMPTS = [
    PREFIX + " the quick brown fox",
    PREFIX + " hello world, hello there",
    PREFIX + " naïve café",
    "héllo wörld 日本語 🙂",
    "to",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return family_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def test_checkpoints_are_sharded_with_an_index(family_dir: Path) -> None:
    index = json.loads((family_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert len(list(family_dir.glob("*.safetensors"))) >= 3


def test_greedy_equals_transformers_generate_fp32(family_dir: Path) -> None:
    engine = build_engine(engine_config(family_dir))
    engine.eos_token_ids = frozenset()  # compare full lengths, like min_new_tokens
    expected = {p: hf_greedy(family_dir, p, NEW_TOKENS) for p in PROMPTS}
    window = engine.runner.model.shape.sliding_window  # type: ignore[attr-defined]
    if window is not None:  # the window really cuts: prompt + generation outgrow it
        longest = max(len(engine.tokenizer(p).input_ids) for p in PROMPTS)
        assert longest > window and longest + NEW_TOKENS > 2 * window
    alone = {p: token_ids(run(engine, [greedy(p, "x", NEW_TOKENS)])["x"]) for p in PROMPTS}
    batched = run(engine, [greedy(p, f"r{i}", NEW_TOKENS) for i, p in enumerate(PROMPTS)])
    shared = run(engine, [greedy(p, f"p{i}", NEW_TOKENS) for i, p in enumerate(PROMPTS[:3])])
    staggered = run(engine, [greedy(p, f"s{i}", NEW_TOKENS) for i, p in enumerate(PROMPTS)], join_every=3)
    for i, p in enumerate(PROMPTS):
        assert alone[p] == expected[p], p
        assert token_ids(batched[f"r{i}"]) == expected[p], p
        assert token_ids(staggered[f"s{i}"]) == expected[p], p
        if i < 3:
            assert token_ids(shared[f"p{i}"]) == expected[p], p


def test_the_engine_reads_the_config_and_tokenizer_as_transformers_does(family_dir: Path) -> None:
    assert built_from(read_checkpoint_config(family_dir)) == built_from(
        AutoConfig.from_pretrained(family_dir)
    )
    ours = load_model(engine_config(family_dir)).tokenizer
    assert type(ours) is type(AutoTokenizer.from_pretrained(family_dir))


def test_planner_and_engine_agree_on_the_shape(family_dir: Path) -> None:
    from twinserve.planner.model_shape import from_folder

    engine_shape = ModelShape.from_config(read_checkpoint_config(family_dir))
    planned = from_folder(family_dir)
    assert (
        planned.num_layers,
        planned.num_kv_heads,
        planned.num_attention_heads,
        planned.head_dim,
        planned.vocab_size,
        planned.hidden_size,
        planned.intermediate_size,
        planned.tie_word_embeddings,
        planned.max_position_embeddings,
    ) == (
        engine_shape.num_layers,
        engine_shape.num_kv_heads,
        engine_shape.num_heads,
        engine_shape.head_dim,
        engine_shape.vocab_size,
        engine_shape.hidden_size,
        engine_shape.intermediate_size,
        engine_shape.tie_word_embeddings,
        engine_shape.max_position_embeddings,
    )
    # the KV cache the planner sizes is the one the engine allocates
    engine = build_engine(engine_config(family_dir))
    cache = engine.runner.cache  # type: ignore[attr-defined]
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim) == (
        planned.num_layers,
        planned.num_kv_heads,
        planned.head_dim,
    )
