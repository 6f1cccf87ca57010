"""`bench http-overhead` on the tiny model: both sides run every round (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from twinserve.bench.http_overhead import HttpOverheadConfig, run_http_overhead_bench
from twinserve.cli.main import app


def test_every_round_measures_both_sides(tiny_model_dir: Path) -> None:
    steps: list[str] = []
    cfg = HttpOverheadConfig(
        model=str(tiny_model_dir), dtype="float32", concurrency=4, max_new_tokens=6, rounds=2
    )
    report = run_http_overhead_bench(cfg, progress=steps.append)
    assert len(report.rounds) == 2
    for r in report.rounds:
        assert r.in_process.tokens_per_s > 0 and r.http.tokens_per_s > 0
        assert r.in_process.ttft_ms_p50 > 0 and r.http.ttft_ms_p50 > 0
    ratios = sorted(r.ratio for r in report.rounds)
    assert ratios[0] <= report.throughput_ratio_median <= ratios[-1]
    # rounds alternate which side goes first, so drift hits both
    assert steps.index("round 1: in-process") < steps.index("round 1: HTTP")
    assert steps.index("round 2: HTTP") < steps.index("round 2: in-process")


def test_cli_prints_json(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "http-overhead",
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "float32",
            "--concurrency",
            "2",
            "--max-new-tokens",
            "4",
            "--rounds",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert len(report["rounds"]) == 1 and report["throughput_ratio_median"] > 0
