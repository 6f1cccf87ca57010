"""`bench engine --peer llama-cpp` on the default model, where llama-cpp-python is installed.

Its source build takes minutes, so CI does not install the [bench] extra and this skips there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from twinserve.bench.engine_bench import EngineBenchConfig, run_engine_bench

pytest.importorskip("llama_cpp")


def test_peer_runs_w1_and_ttft_on_the_default_models_own_gguf(default_model_path: Path) -> None:
    from twinserve.registry.default_model import default_model_gguf

    cfg = EngineBenchConfig(
        model=str(default_model_path),
        concurrency=2,
        max_new_tokens=4,
        w1_requests=2,
        ttft_prompt_tokens=20,
        baseline=False,
        peer="llama-cpp",
        peer_gguf=str(default_model_gguf(progress=False)),
    )
    report = run_engine_bench(cfg)
    peer = [r for r in report.results if r.system.startswith("llama.cpp")]
    assert len(peer) == 1 and peer[0].name == "W1" and peer[0].output_tokens == 2 * 4
    assert set(report.ratios) == {"W1_vs_peer", "ttft_vs_peer"}
    assert report.peer_ttft_ms is not None and report.peer_ttft_ms > 0
