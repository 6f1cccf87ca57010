"""llama.cpp as a peer of `twinserve bench engine` (`--peer llama-cpp`), in the same process.

Through llama-cpp-python (`pip install 'twinserve[bench]'`; its source build takes minutes
on 2 cores, so nothing else needs it). It is given the engine's own token ids, so both sides
see the same prompts token for token, and decodes greedily without stopping at EOS, as the
engine's workloads do. Its prompt cache is reset before every request, as the engine bench
runs with the prefix cache off: each request pays its whole prefill on both sides.
Build and call it only through `AsyncEngine.call`: llama.cpp's OpenMP threads then belong to
the same thread as torch's, so neither side pays futex wake-ups for the other's pool.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twinserve.errors import ValidationError


class LlamaCppPeer:
    """One llama.cpp context over a GGUF, `threads` threads for decode and prefill alike."""

    def __init__(self, gguf: Path, *, threads: int, context_tokens: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ValidationError(
                "--peer llama-cpp needs llama-cpp-python: pip install 'twinserve[bench]' "
                "(a source build, several minutes on 2 cores)",
                param="peer",
            ) from exc
        if not gguf.is_file():
            raise ValidationError(f"peer GGUF {gguf} is not a file", param="peer_gguf")
        self.gguf = gguf
        self.llm: Any = Llama(
            model_path=str(gguf),
            n_ctx=context_tokens,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.single([1, 2, 3], 2)  # warm up

    def single(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[int, float, float]:
        """Tokens out, seconds including prefill, and time to the first token."""
        self.llm.reset()
        start = time.perf_counter()
        first = 0.0
        count = 0
        for _ in self.llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter() - start
            if count >= max_new_tokens:
                break
        return count, time.perf_counter() - start, first

    @property
    def description(self) -> str:
        return f"llama.cpp ({self.gguf.name})"
