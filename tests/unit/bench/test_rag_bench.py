"""`bench rag`'s pure parts: the per-mode summary, the overhead ratio, the report's rows and goals.
(The bench itself starts three servers on the default model: run by hand, never in tests.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twinserve.bench.rag_bench import (
    IngestResult,
    ModeResult,
    RagBenchConfig,
    RagBenchReport,
    mode_result,
    overhead_ratio,
)
from twinserve.bench.rag_load import Outcome, split
from twinserve.cli.main import app


def test_mode_result_counts_failures_and_takes_percentiles_of_successes_only() -> None:
    outcomes = [
        Outcome(1.0, retrieval_ms=10.0, prompt_ms=5.0, llm_ms=900.0, completion_tokens=5),
        Outcome(2.0, retrieval_ms=30.0, prompt_ms=7.0, llm_ms=1900.0, completion_tokens=7),
        Outcome(3.0, retrieval_ms=20.0, prompt_ms=None, llm_ms=2900.0, completion_tokens=1),
        Outcome(0.01, error="424 llm_failed"),
        Outcome(0.02, error="424 llm_failed"),
    ]
    result = mode_result("rag", outcomes, seconds=4.0)
    assert (result.completed, result.failed) == (3, 2)
    assert result.errors == {"424 llm_failed": 2}
    assert result.latency_ms is not None
    assert result.latency_ms.p50 == pytest.approx(2000.0)  # the failures' 10-20 ms left out
    assert result.latency_ms.p90 == pytest.approx(2800.0)  # linear between 2000 and 3000
    assert result.retrieval_ms_p50 == pytest.approx(20.0)
    assert result.prompt_ms_p50 == pytest.approx(6.0)  # of the two that reported one
    assert result.llm_ms_p50 == pytest.approx(1900.0)
    assert result.completion_tokens == 13


def test_a_mode_without_retrieval_timings_reports_none() -> None:
    result = mode_result("direct", [Outcome(0.5, completion_tokens=3)], seconds=0.5)
    assert result.service_p50s() == (None, None, None) and result.completion_tokens == 3


def _mode(name: str, p50_seconds: list[float], retrieval: float | None = None) -> ModeResult:
    return mode_result(name, [Outcome(s, retrieval_ms=retrieval) for s in p50_seconds], seconds=1.0)


def test_overhead_ratio_subtracts_the_reported_retrieval_from_the_rag_p50() -> None:
    rag = _mode("rag", [1.1, 1.2, 1.3], retrieval=150.0)  # p50 1200 ms
    direct = _mode("direct", [0.9, 1.0, 1.1])  # p50 1000 ms
    assert overhead_ratio(rag, direct) == pytest.approx((1200 - 150) / 1000)


def test_overhead_ratio_is_none_when_a_side_has_no_success() -> None:
    failed = mode_result("direct", [Outcome(0.1, error="503 unavailable")], seconds=0.1)
    assert overhead_ratio(_mode("rag", [1.0], retrieval=10.0), failed) is None
    assert overhead_ratio(failed, _mode("direct", [1.0])) is None


def _report(ratio_rag_p50: float, chunks_per_s: float) -> RagBenchReport:
    micro = _mode("micro /rag", [ratio_rag_p50], retrieval=100.0)
    direct = _mode("direct LLM", [1.0])
    return RagBenchReport(
        config=RagBenchConfig(docs=Path("docs")),
        cpu_count=2,
        ingest=IngestResult(
            files=3,
            chunks=100,
            seconds=100 / chunks_per_s,
            chunks_per_s=chunks_per_s,
            embeddings_per_s=chunks_per_s * 2,
        ),
        microservices=micro,
        direct=direct,
        overhead_ratio=overhead_ratio(micro, direct),
        monolith_overhead_ratio=None,
    )


def test_goals_say_met_or_missed() -> None:
    good = _report(1.1, 250.0)  # (1100 - 100) / 1000 = 1.0
    assert [met for *_, met in good.goals()] == [True, None, True]
    bad = _report(1.3, 150.0)  # (1300 - 100) / 1000 = 1.2
    assert [met for *_, met in bad.goals()] == [False, None, False]
    assert bad.goals()[0][1] == "1.200"


def test_rows_list_each_mode_that_ran_and_the_report_round_trips_json() -> None:
    report = _report(1.1, 250.0)
    assert report.rows() == [
        ("micro /rag", "1/0", "1100", "1100", "100", "-", "-"),
        ("direct LLM", "1/0", "1000", "1000", "-", "-", "-"),
    ]
    again = RagBenchReport.model_validate(json.loads(report.model_dump_json()))
    assert again == report


def test_split_covers_every_request_once_in_turns() -> None:
    assert split(64, 2) == [range(0, 32), range(32, 64)]
    assert split(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split(2, 4) == [range(0, 1), range(1, 2)]  # never an empty part


def test_bench_rag_help() -> None:
    result = CliRunner().invoke(app, ["bench", "rag", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--docs", "--llm", "--requests", "--concurrency", "--no-monolith", "--json"):
        assert option in result.output
