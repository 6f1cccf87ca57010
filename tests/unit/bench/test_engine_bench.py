"""`bench engine` on the tiny model: the report counts what both sides generated (no timing asserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import tiny_llama_dir
from twinserve.bench.engine_bench import EngineBenchConfig, run_engine_bench
from twinserve.cli.main import app


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("bench-model"))


def test_report_counts_tokens_of_both_sides(model_dir: Path) -> None:
    cfg = EngineBenchConfig(
        model=str(model_dir),
        dtype="float32",
        concurrency=3,
        max_new_tokens=5,
        w1_requests=2,
        ttft_prompt_tokens=20,
    )
    report = run_engine_bench(cfg)
    by_key = {(r.name, r.system): r for r in report.results}
    assert by_key[("W3", "twinserve")].output_tokens == 2 * 3 * 5  # run before and after the baseline
    assert by_key[("W3", "hf-generate")].output_tokens == 3 * 5
    assert by_key[("W1", "twinserve")].output_tokens == by_key[("W1", "hf-generate")].output_tokens == 2 * 5
    assert set(report.ratios) == {"W3_throughput", "W1_tokens_per_s", "ttft_vs_prefill"}
    assert report.peak_rss_mb_w32 > 0


def test_cli_json_without_baseline(model_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "engine",
            "--model",
            str(model_dir),
            "--dtype",
            "float32",
            "--concurrency",
            "2",
            "--max-new-tokens",
            "3",
            "--w1-requests",
            "1",
            "--no-baseline",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ratios"] == {}
    assert [r["system"] for r in report["results"]] == ["twinserve", "twinserve"]


def test_llama_cpp_peer_without_its_package_names_the_extra(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twinserve.bench.llama_cpp_peer import LlamaCppPeer
    from twinserve.errors import ValidationError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # an import of it raises ImportError
    with pytest.raises(ValidationError, match=r"twinserve\[bench\]"):
        LlamaCppPeer(model_dir / "model.gguf", threads=1, context_tokens=64)


def test_cli_peer_needs_the_gguf_of_a_model_given(model_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["bench", "engine", "--model", str(model_dir), "--peer", "llama-cpp", "--no-baseline"]
    )
    assert result.exit_code == 2 and "--peer-gguf" in result.output, result.output
