"""What the planner must know about a model: how many parameters, and the shape of its KV cache.

Read from a Hugging Face `config.json` (a folder, a registry reference, a Hub id) or taken
from a preset. Nothing here loads weights or imports torch: a registry reference reads the
version's files in place (or downloads `config.json` alone from a remote artifact store),
a Hub id downloads `config.json` alone, and a local folder's safetensors headers (a few KB
each) give the exact parameter count.

| source                          | parameters                                  | KV shape      |
|---------------------------------|---------------------------------------------|---------------|
| `--preset llama-3.1-8b`         | the preset's exact count                    | the preset's  |
| `--params 8e9` (no preset)      | as given                                    | nearest preset by size (a note says so) |
| a folder / `models:/…` / Hub id | safetensors headers, else from config.json  | config.json   |
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from twinserve.config import Quantize
from twinserve.errors import NotFoundError, ValidationError

DEFAULT_PRESET = "smollm2-135m"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class ModelShape(BaseModel):
    """Architecture facts of a decoder-only transformer (Llama family and alike)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="What the model is called in the plan.")
    params: int = Field(ge=1, description="Parameters in total (embeddings included).")
    num_layers: int = Field(ge=1, description="Decoder layers (num_hidden_layers).")
    hidden_size: int = Field(ge=1, description="Model width.")
    num_attention_heads: int = Field(ge=1, description="Query heads.")
    num_kv_heads: int = Field(ge=1, description="Key/value heads (GQA); = query heads without GQA.")
    head_dim: int = Field(ge=1, description="Width of one head.")
    intermediate_size: int = Field(ge=1, description="MLP width.")
    vocab_size: int = Field(ge=1, description="Vocabulary size (rows of the embedding).")
    tie_word_embeddings: bool = Field(description="lm_head shares the embedding matrix.")
    max_position_embeddings: int = Field(ge=2, description="Longest context the model was trained for.")
    source: str = Field(description="Where these facts came from (preset, config.json path, ...).")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        return self

    @property
    def embedding_params(self) -> int:
        """Embedding matrix, plus lm_head when it is not tied (neither is quantized by bitsandbytes)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def linear_params(self) -> int:
        """Parameters of the attention and MLP projections: what weight quantization shrinks."""
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return max(0, self.params - self.embedding_params - norms)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers: 2 × layers × kv_heads × head_dim × bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


class ModelSource(BaseModel):
    """A model shape plus the serving hints its registry model card recorded, if any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: ModelShape = Field(description="Architecture facts.")
    reference: str | None = Field(
        None, description="The reference to put in the EndpointConfig; None = none given."
    )
    card_max_input_tokens: int | None = Field(
        None, ge=1, description="Model card's recommended MAX_INPUT_TOKENS."
    )
    card_max_total_tokens: int | None = Field(
        None, ge=2, description="Model card's recommended MAX_TOTAL_TOKENS."
    )
    card_quantize: Quantize | None = Field(None, description="Model card's recommended quantization.")


def _llama_params(
    *, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, vocab: int,
    tied: bool, experts: int = 1, attention_bias: bool = False, mlp_bias: bool = False,
) -> int:  # fmt: skip
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if attention_bias:
        attention += q_out + 2 * kv_out + hidden
    mlp = 3 * hidden * intermediate + (2 * intermediate + hidden if mlp_bias else 0)
    router = hidden * experts if experts > 1 else 0
    per_layer = attention + experts * mlp + router + 2 * hidden
    return layers * per_layer + hidden + vocab * hidden * (1 if tied else 2)


def _preset(
    name: str, *, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
    vocab: int, tied: bool, max_pos: int, hub_id: str,
) -> ModelShape:  # fmt: skip
    params = _llama_params(
        layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, vocab=vocab, tied=tied,
    )  # fmt: skip
    return ModelShape(
        name=name, params=params, num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
        tie_word_embeddings=tied, max_position_embeddings=max_pos, source=f"preset {name} ({hub_id} config.json)",
    )  # fmt: skip


# The configs of the public checkpoints; the parameter counts these give are exact
# (8,030,261,248 for Llama-3.1-8B, 134,515,008 for SmolLM2-135M).
PRESETS: dict[str, ModelShape] = {
    "smollm2-135m": _preset(
        "smollm2-135m",
        layers=30,
        hidden=576,
        heads=9,
        kv_heads=3,
        head_dim=64,
        intermediate=1536,
        vocab=49152,
        tied=True,
        max_pos=8192,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "mistral-7b": _preset(
        "mistral-7b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=14336,
        vocab=32768,
        tied=False,
        max_pos=32768,
        hub_id="mistralai/Mistral-7B-Instruct-v0.3",
    ),
    "llama-3.1-8b": _preset(
        "llama-3.1-8b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=14336,
        vocab=128256,
        tied=False,
        max_pos=131072,
        hub_id="meta-llama/Llama-3.1-8B",
    ),
    "llama-3.1-70b": _preset(
        "llama-3.1-70b",
        layers=80,
        hidden=8192,
        heads=64,
        kv_heads=8,
        head_dim=128,
        intermediate=28672,
        vocab=128256,
        tied=False,
        max_pos=131072,
        hub_id="meta-llama/Llama-3.1-70B",
    ),
}
# Fine-tunes keep their base model's shape.
ALIASES: dict[str, str] = {
    "twinllama-3.1-8b": "llama-3.1-8b",
    "llama-3-8b": "llama-3.1-8b",
    "llama-3-70b": "llama-3.1-70b",
    "smollm2-135m-instruct": "smollm2-135m",
}


def preset(name: str) -> ModelShape:
    """A preset by name (case-insensitive, aliases allowed); ValidationError listing the known ones."""
    asked = name.strip().lower()
    key = ALIASES.get(asked, asked)
    if key not in PRESETS:
        known = ", ".join([*PRESETS, *ALIASES])
        raise ValidationError(f"unknown preset {name!r}; known presets: {known}")
    if asked != key:  # a fine-tune: its own name, its base model's architecture
        base = PRESETS[key]
        return base.model_copy(update={"name": asked, "source": f"{base.source}, base model of {asked}"})
    return PRESETS[key]


def from_params(params: float, like: str | None = None) -> tuple[ModelShape, str | None]:
    """A shape with `params` parameters; the KV shape of preset `like`, else of the nearest by size.

    Returns the shape and, when the architecture was guessed, a note saying from what.
    """
    if not math.isfinite(params) or params < 1:
        raise ValidationError(f"--params must be a positive number of parameters, got {params!r}")
    count = round(params)
    if like is not None:
        base = preset(like)
        return base.model_copy(
            update={"params": count, "source": f"{base.source}, --params {count:.4g}"}
        ), None
    base = min(PRESETS.values(), key=lambda p: abs(math.log(p.params / count)))
    shape = base.model_copy(
        update={"name": f"{count / 1e9:.3g}B params", "params": count, "source": f"--params {count:.4g}"}
    )
    note = (
        f"only a parameter count was given: layers, KV heads and head size are {base.name}'s "
        f"(the nearest preset by size); give --preset or --model for an exact KV cache size"
    )
    return shape, note


def from_config(config: dict[str, Any], *, name: str, source: str, params: int | None = None) -> ModelShape:
    """Shape from a config.json mapping; `params` (e.g. counted from safetensors) overrides the formula."""
    cfg = config.get("text_config") or config  # multimodal configs nest the language model
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = int(cfg["num_hidden_layers"])
        intermediate = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValidationError(
            f"{source}: not a decoder config the planner understands (missing or bad {exc}); "
            "give --preset or --params instead"
        ) from exc
    # transformers' own default is tied; Llama/Mistral configs always state it
    tied = bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True)))
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
    counted = params or _llama_params(
        layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, vocab=vocab, tied=tied, experts=experts,
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
    )  # fmt: skip
    try:
        return ModelShape(
            name=name, params=counted, num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
            tie_word_embeddings=tied, max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            source=source,
        )  # fmt: skip
    except ValueError as exc:
        raise ValidationError(f"{source}: {exc}") from exc


def safetensors_params(folder: Path) -> int | None:
    """Exact parameter count from the headers of the folder's safetensors files (no tensor is read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with file.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > _MAX_HEADER_BYTES:
                    return None
                header = json.loads(fh.read(size))
        except (OSError, struct.error, ValueError):
            return None
        for key, entry in header.items():
            if key != "__metadata__":
                total += math.prod(entry.get("shape", []))
    return total or None


def from_folder(folder: Path, *, name: str | None = None, source: str | None = None) -> ModelShape:
    """Shape of a Hugging Face layout folder, from its config.json and safetensors headers."""
    config_path = folder / "config.json"
    where = source or str(config_path)
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise NotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?") from exc
    except (OSError, ValueError) as exc:
        raise ValidationError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValidationError(f"{config_path} is not a JSON object")
    # packed quantized checkpoints (GPTQ, AWQ) store int32 words, not parameters: use the config
    params = None if "quantization_config" in config else safetensors_params(folder)
    if params is not None:
        where += " (parameters counted from safetensors headers)"
    return from_config(config, name=name or folder.name, source=where, params=params)


def resolve_source(reference: str, revision: str | None = None) -> ModelSource:
    """Shape of the model a reference names: `default`, a folder, `models:/…`, or a Hub id.

    NotFoundError (404) when it does not exist, ValidationError (422) for a malformed reference
    or a config the planner cannot read.
    """
    from twinserve.registry.refs import AliasRef, DefaultRef, HubRef, LocalRef, VersionRef, parse_ref

    ref = parse_ref(reference, revision)
    if isinstance(ref, DefaultRef):
        base = PRESETS[DEFAULT_PRESET]
        shape = base.model_copy(update={"source": f"default model (SmolLM2-135M-Instruct), {base.source}"})
        return ModelSource(shape=shape, reference=reference)
    if isinstance(ref, VersionRef | AliasRef):
        return _from_registry(ref, reference)
    if isinstance(ref, HubRef):
        return ModelSource(shape=_from_hub(ref.repo_id, ref.revision), reference=reference)
    assert isinstance(ref, LocalRef)
    if not ref.path.is_dir():
        raise NotFoundError(f"model {reference!r}: no such folder")
    return ModelSource(shape=from_folder(ref.path.resolve()), reference=reference)


def _from_registry(ref: Any, reference: str) -> ModelSource:
    import tempfile

    from twinserve.registry.backend import local_path
    from twinserve.registry.refs import AliasRef
    from twinserve.registry.store import ModelRegistry

    registry = ModelRegistry()
    if isinstance(ref, AliasRef):
        info = registry.get_version(ref.name, alias=ref.alias)
    else:
        info = registry.get_version(ref.name, ref.version)
    name = f"{info.name} v{info.version}"
    folder = local_path(info.source)
    if folder is not None and (folder / "config.json").is_file():
        shape = from_folder(folder, name=name, source=f"{info.uri} ({folder}/config.json)")
    else:  # remote artifact store: fetch config.json alone, never the weights
        import mlflow.artifacts

        from twinserve.registry.backend import mlflow_errors

        with tempfile.TemporaryDirectory() as tmp, mlflow_errors(f"config.json of {info.uri}"):
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{info.source.rstrip('/')}/config.json",
                dst_path=tmp,
                tracking_uri=registry.location.uri,
            )
            config = json.loads(Path(got).read_text())
        shape = from_config(config, name=name, source=f"{info.uri} (config.json)")
    card = info.card
    return ModelSource(
        shape=shape, reference=reference, card_max_input_tokens=card.max_input_tokens,
        card_max_total_tokens=card.max_total_tokens, card_quantize=card.quantization,
    )  # fmt: skip


def _from_hub(repo_id: str, revision: str | None) -> ModelShape:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise NotFoundError(
            f"config.json of {repo_id} could not be had from the Hub or its cache: {exc}"
        ) from exc
    config = json.loads(path.read_text())
    return from_config(config, name=repo_id, source=f"hf://{repo_id} config.json")
