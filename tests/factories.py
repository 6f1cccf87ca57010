"""Small builders for tests: a byte-level BPE tokenizer and a tiny random Llama folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from twinserve.config import EngineConfig

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there, general kenobi",
    "héllo wörld 日本語 🙂 naïve café",
    "once upon a time there was a dragon and a knight",
    "to be or not to be, that is the question",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with chat special tokens, trained in-process (~ms)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_dir(
    path: Path,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    attention_bias: bool = False,
) -> Path:
    """Save a random Llama (hidden 64, GQA 4/2 heads) with the tiny tokenizer to `path`."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,  # q/k/v/o biases, as Qwen2 has for q/k/v
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # peaked logits: greedy decoding without near-ties
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # transformers starts biases at zero, which would hide bias bugs
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# small limits so tests exercise the budgets; fp32 for exact comparisons
SMALL_LIMITS: dict[str, object] = {
    "dtype": "float32",
    "max_input_tokens": 128,
    "max_total_tokens": 256,
    "max_batch_prefill_tokens": 512,
    "max_batch_total_tokens": 4096,
    "max_batch_size": 16,
    "max_concurrent_requests": 32,
    "kv_cache_idle_release_s": 0.0,  # tests see the cache released as soon as the engine is idle
}


def engine_config(model: Path, **overrides: object) -> EngineConfig:
    """An engine config with SMALL_LIMITS."""
    values: dict[str, object] = {"model": str(model), **SMALL_LIMITS, **overrides}
    return EngineConfig.model_validate(values)


# The architectures the engine serves, as tiny random configs (each with what sets it apart).
_FAMILY_BASE: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.2,  # peaked logits: greedy decoding without near-ties
}
FAMILIES: dict[str, dict[str, object]] = {
    "llama2": {"model_type": "llama", "tie_word_embeddings": False},
    "llama3.1": {
        "model_type": "llama",
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        # wavelengths above 64 positions are stretched 8x: most of a head_dim-16 model's
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "llama-yarn": {  # YaRN: stretched frequencies and an attention factor on cos/sin
        "model_type": "llama",
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    },
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False, "sliding_window": 16},
    "qwen2-tied": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen2-sliding": {
        "model_type": "qwen2",
        "tie_word_embeddings": False,
        "num_hidden_layers": 3,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 1,  # layer 0 full attention, layers 1-2 sliding
    },
}


def family_config(family: str, **overrides: object) -> object:
    """A transformers config of `family` (FAMILIES) sized for tests, with the tiny tokenizer's ids."""
    from transformers import AutoConfig

    tokenizer = tiny_tokenizer()
    values = {**_FAMILY_BASE, **FAMILIES[family], **overrides}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **values,
    )


def family_model_dir(
    path: Path, family: str, *, seed: int = 0, max_shard_size: str | None = "150KB", **overrides: object
) -> Path:
    """Save a random model of `family` (fp32), sharded by default (≥ 3 shards and an index)."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # transformers starts biases at zero, which would hide bias bugs
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(path)
    return path
