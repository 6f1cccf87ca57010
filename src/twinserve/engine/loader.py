"""Load a Hugging Face layout folder into the engine's model, safetensors only.

Pickle checkpoints (`*.bin`, `*.pt`) can run arbitrary code when loaded, so they are
refused with a message that says how to convert them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from twinserve.config import EngineConfig
from twinserve.engine.models.checkpoint_config import read_checkpoint_config
from twinserve.engine.models.llama import LlamaModel
from twinserve.engine.smoothquant import calibration_token_ids
from twinserve.errors import ModelLoadError, NotFoundError

log = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_INDEX = "model.safetensors.index.json"
# tensors a checkpoint may hold that the forward pass rightly ignores
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    """The model, its tokenizer and the facts a server reports about them."""

    model: LlamaModel
    tokenizer: Any
    config: Any
    eos_token_ids: frozenset[int]
    model_path: Path
    dtype: torch.dtype
    device: torch.device
    weights_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the hardware runs it natively (CUDA ≥ Ampere, CPU with AMX/AVX512-BF16)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


def resolve_attention(name: str, device: torch.device) -> str:
    if name == "sdpa":
        return name
    try:
        import flash_attn  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    if name == "flash_attention_2":
        if device.type != "cuda" or not installed:
            raise ModelLoadError("flash_attention_2 needs a CUDA device and the flash-attn package")
        return name
    return "flash_attention_2" if device.type == "cuda" and installed else "sdpa"


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors shards; refuses pickle-only checkpoints."""
    if not path.is_dir():
        raise NotFoundError(f"model folder not found: {path}")
    index = shard_index(path)
    if index is not None:
        files = [path / s for s in sorted(set(index.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"safetensors shards missing in {path}: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); twinserve loads safetensors "
            "only, because unpickling can run arbitrary code. Convert once with: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )
    raise ModelLoadError(f"no safetensors weights in {path}")


def shard_index(path: Path) -> dict[str, str] | None:
    """Tensor name → shard file name from `model.safetensors.index.json`; None without an index."""
    index = path / _INDEX
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read {index}: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index}: weight_map is not a mapping of tensor names to shard files")
    outside = sorted({v for v in weight_map.values() if Path(v).name != v or v in (".", "..")})
    if outside:  # a shard must be a file of this folder, never a path out of it
        raise ModelLoadError(f"{index}: shard {outside[0]!r} is not a file name in {path}")
    return weight_map


def read_weights(files: list[Path]) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the shards, and a sha256 over the files (what `/info` reports)."""
    return read_tensors(files), hash_weights(files)


def read_tensors(
    files: list[Path], *, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of the shards, each converted to `dtype` and moved to `device` as it is read.

    Each shard is opened (memory-mapped) once and closed before the next, and each tensor is
    converted on its own, so a 16-bit load of an fp32 checkpoint peaks at the converted
    model plus one shard, never at a full fp32 copy. Where the folder has an index, each
    shard must hold exactly the tensors the index assigns to it.
    """
    index = shard_index(files[0].parent) if files else None
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            if index is not None:
                _check_shard(file, names, index)
            for name in names:
                if name in weights:
                    raise ModelLoadError(f"tensor {name!r} is in more than one shard (again in {file.name})")
                tensor = f.get_tensor(name)  # a view of the memory map
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                else:  # a copy: a view would keep the whole shard mapped (and resident) for good
                    tensor = tensor.clone()
                weights[name] = tensor if device is None else tensor.to(device)
    return weights


def _check_shard(file: Path, names: list[str], index: dict[str, str]) -> None:
    listed = {n for n, shard in index.items() if shard == file.name}
    held = set(names)
    if listed != held:
        missing, unlisted = sorted(listed - held), sorted(held - listed)
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"not in the index: {', '.join(unlisted[:3])}" if unlisted else "",
            )
            if part
        )
        raise ModelLoadError(f"shard {file.name} disagrees with {_INDEX} ({detail})")


def hash_weights(files: list[Path]) -> str:
    """One sha256 over the bytes of the shards, in order (the registry's `content_sha256`)."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weights_digest(cfg: EngineConfig, files: list[Path]) -> str:
    """The weights' sha256: the one given in `cfg` (verified by the registry), else hashed here.

    Hashing reads every weight byte once more (seconds to minutes for large models); a registry
    version's hash was already checked against its files on resolve, so it is not redone.
    """
    if cfg.weights_sha256 is not None:
        log.debug(
            "weights_sha256 %s… given (verified by the registry): not hashed again", cfg.weights_sha256[:12]
        )
        return cfg.weights_sha256
    return hash_weights(files)


def eos_ids(path: Path, config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    sources: list[Any] = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    gen = path / "generation_config.json"
    if gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(i for i in src if isinstance(i, int))
    return frozenset(ids)


def _names_its_class(path: Path) -> bool:
    """Whether tokenizer_config.json names the tokenizer class, so AutoTokenizer can be given our
    config instead of reading it again through AutoConfig (~1.8 s); without a class, AutoTokenizer
    picks one from transformers' own config class, which only AutoConfig gives it."""
    try:
        return isinstance(
            json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class"), str
        )
    except (OSError, ValueError, AttributeError):
        return False


def load_model(cfg: EngineConfig) -> LoadedModel:
    """Build the engine's model from a folder, on the configured device and dtype."""
    from transformers import AutoTokenizer

    path = Path(cfg.model).expanduser()
    files = safetensors_files(path)
    config = read_checkpoint_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config if _names_its_class(path) else None)
    except Exception as exc:  # transformers' validators raise their own types (e.g. huggingface_hub's)
        raise ModelLoadError(f"cannot read tokenizer in {path}: {exc}") from exc
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.quantize in ("bitsandbytes", "bitsandbytes-nf4") and dtype == torch.float32:
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    attention = resolve_attention(cfg.attention, device)
    # bitsandbytes quantizes from the host copy; int8 and int4 from the checkpoint's own precision
    load_dtype = None if cfg.quantize in ("int8", "int4") else dtype
    load_device = torch.device("cpu") if cfg.quantize in ("bitsandbytes", "bitsandbytes-nf4") else device
    weights = read_tensors(files, dtype=load_dtype, device=load_device)
    sha = weights_digest(cfg, files)
    calibration = calibration_token_ids(tokenizer) if cfg.quantize == "int8" else None
    model = LlamaModel(
        config,
        weights,
        dtype=dtype,
        device=device,
        quantize=cfg.quantize,
        attention=attention,
        calibration_ids=calibration,
    )
    unused = sorted(n for n in weights if not n.endswith(_IGNORABLE_SUFFIXES))
    if unused:
        raise ModelLoadError(
            f"{path} holds weights the engine's {config.model_type} forward pass would ignore "
            f"({', '.join(unused[:5])}{', …' if len(unused) > 5 else ''}): its architecture differs "
            "from what the engine implements"
        )
    log.info(
        "loaded %s on %s as %s (quantize=%s, attention=%s)", path, device, dtype, cfg.quantize, attention
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=config,
        eos_token_ids=eos_ids(path, config, tokenizer),
        model_path=path,
        dtype=model.act_dtype,
        device=device,
        weights_sha256=sha,
        extra={"attention": attention, "quantize": cfg.quantize},
    )
