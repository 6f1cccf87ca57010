"""`bench serve`: the statistics on hand-made timings, then real runs against a real server."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.factories import tiny_llama_dir
from tests.servers import ThreadServer, serve_config, thread_server
from twinserve.bench.serve_bench import (
    RequestRecord,
    ServeBenchConfig,
    load_prompts,
    serve_bench,
    summarize,
)
from twinserve.bench.stats import Distribution, Slo, itls, percentile, tpot
from twinserve.cli.main import app

K = 6


# ------------------------------------------------------------------ statistics
def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_is_in_milliseconds() -> None:
    d = Distribution.of([0.001, 0.002, 0.003])
    assert d is not None
    assert (d.count, d.mean, d.p50) == (3, pytest.approx(2.0), pytest.approx(2.0))
    assert Distribution.of([]) is None


def test_tpot_and_itl() -> None:
    # 5 tokens: first at 0.2 s, done at 1.0 s → 4 gaps of 0.2 s
    assert tpot(latency=1.0, ttft=0.2, output_tokens=5) == pytest.approx(0.2)
    assert tpot(latency=1.0, ttft=0.2, output_tokens=1) is None
    assert itls([0.2, 0.3, 0.6]) == pytest.approx([0.1, 0.3])
    assert itls([0.2]) == []


def test_slo_parse_and_met() -> None:
    slo = Slo.parse("ttft_ms=100, tpot_ms=20")
    assert (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms) == (100, 20, None)
    assert slo.met(ttft=0.05, tpot_s=0.01, latency=9.0)
    assert not slo.met(ttft=0.2, tpot_s=0.01, latency=0.3)
    assert not slo.met(ttft=0.05, tpot_s=0.03, latency=0.3)
    assert slo.met(ttft=0.05, tpot_s=None, latency=0.3)  # one token: no TPOT to miss
    with pytest.raises(ValueError):
        Slo.parse("ttft=100")
    with pytest.raises(ValueError):
        Slo.parse("ttft_ms")


def test_summarize_hand_made_records() -> None:
    cfg = ServeBenchConfig(url="http://x", slo=Slo(ttft_ms=150, tpot_ms=100))
    records = [
        # 3 tokens, chunks at 0.1, 0.2, 0.4 → TPOT (0.5-0.1)/2 = 0.2 s: misses the TPOT SLO
        RequestRecord(True, 0.5, [0.1, 0.2, 0.4], output_tokens=3, prompt_tokens=10, counted_by_server=True),
        # 2 tokens: TPOT (0.3-0.1)/1 = 0.2 s... also misses; ttft ok
        RequestRecord(True, 0.3, [0.1, 0.15], output_tokens=2, prompt_tokens=5, counted_by_server=True),
        # 1 token: meets (no TPOT), ttft 0.12 s
        RequestRecord(True, 0.12, [0.12], output_tokens=1, prompt_tokens=7, counted_by_server=True),
        RequestRecord(False, 0.01, error="429 overloaded", error_message="full"),
        RequestRecord(False, 0.01, error="429 overloaded", error_message="still full"),
    ]
    report = summarize(cfg, records, duration=2.0)
    assert (report.completed, report.failed) == (3, 2)
    assert report.errors == {"429 overloaded": 2}
    assert report.error_messages == {"429 overloaded": "full"}
    assert report.total_output_tokens == 6 and report.total_input_tokens == 22
    assert report.request_throughput == pytest.approx(1.5)
    assert report.output_token_throughput == pytest.approx(3.0)
    assert report.tokens_counted_by == "server"
    assert report.ttft_ms is not None and report.ttft_ms.p50 == pytest.approx(100.0)
    assert report.tpot_ms is not None and report.tpot_ms.count == 2
    assert report.tpot_ms.mean == pytest.approx(200.0)
    assert report.itl_ms is not None and report.itl_ms.count == 3  # 2 gaps + 1 gap + 0
    assert report.e2e_ms is not None and report.e2e_ms.p50 == pytest.approx(300.0)
    assert report.good_requests == 1 and report.goodput == pytest.approx(0.5)


def test_report_json_round_trips_infinite_rate() -> None:
    report = summarize(ServeBenchConfig(url="http://x"), [], duration=1.0)
    again = type(report).model_validate_json(report.model_dump_json())
    assert math.isinf(again.config.request_rate)
    assert again.ttft_ms is None and again.goodput is None and again.tokens_counted_by == "none"


def test_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    prompts = load_prompts(path)
    assert [p.prompt for p in prompts] == ["a", None]
    assert prompts[1].messages == [{"role": "user", "content": "b"}]
    path.write_text('{"prompt": "a", "messages": []}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        load_prompts(path)
    assert load_prompts(None)  # the built-in questions


# ------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    model = tiny_llama_dir(tmp_path_factory.mktemp("serve-bench") / "m")
    with thread_server(serve_config(model)) as s:
        yield s


@pytest.mark.parametrize(("api", "chat"), [("tgi", False), ("openai", False), ("openai", True)])
def test_run_against_server(server: ThreadServer, api: str, chat: bool) -> None:
    n = 8
    cfg = ServeBenchConfig(
        url=server.url,
        api=api,
        chat=chat,
        concurrency=3,
        num_prompts=n,
        max_new_tokens=K,
        warmup=2,
        request_rate=200.0,
        slo=Slo(ttft_ms=600_000),
    )
    seen: list[RequestRecord] = []
    report = serve_bench(cfg, seen.append)
    assert len(seen) == n  # warm-up requests are not reported
    assert (report.completed, report.failed, report.errors) == (n, 0, {})
    assert report.total_output_tokens == n * K
    assert report.tokens_counted_by == "server"
    assert report.total_input_tokens > 0
    assert report.good_requests == n
    assert report.ttft_ms is not None and report.e2e_ms is not None and report.tpot_ms is not None
    assert report.ttft_ms.count == report.e2e_ms.count == report.tpot_ms.count == n
    for r in seen:
        assert r.ttft is not None and r.ttft <= r.latency
        assert r.chunk_times == sorted(r.chunk_times)
    assert report.ttft_ms.p50 <= report.e2e_ms.p50 and report.ttft_ms.p99 <= report.e2e_ms.p99
    assert report.itl_ms is not None
    assert report.itl_ms.count == sum(len(r.chunk_times) - 1 for r in seen)
    if api == "tgi":  # one event per token
        assert report.itl_ms.count == n * (K - 1)


def test_messages_in_a_prompts_file_go_to_chat(server: ThreadServer, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hello there"}]}\n{"prompt": "hello there"}\n')
    report = serve_bench(ServeBenchConfig(url=server.url, num_prompts=4, max_new_tokens=2, prompts_file=path))
    assert report.completed == 4 and report.total_output_tokens == 8
    # the chat template makes the conversation longer than the raw prompt
    assert report.total_input_tokens > 0


def test_failures_are_counted_by_kind(server: ThreadServer) -> None:
    cfg = ServeBenchConfig(url=server.url, num_prompts=3, max_new_tokens=10_000)
    report = serve_bench(cfg)
    assert (report.completed, report.failed) == (0, 3)
    assert report.errors == {"422 validation": 3}
    assert "max_new_tokens" in report.error_messages["422 validation"]
    assert report.ttft_ms is None and report.request_throughput == 0


def test_cli_json(server: ThreadServer) -> None:
    args = ["bench", "serve", "--url", server.url, "--api", "openai", "--num-prompts", "4"]
    args += ["--max-new-tokens", "3", "--concurrency", "2", "--slo", "ttft_ms=600000", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["completed"] == 4 and report["total_output_tokens"] == 12
    assert report["good_requests"] == 4
    assert report["config"]["request_rate"] == "Infinity"
    assert "api_key" not in report["config"]


def test_cli_table_and_bad_options(server: ThreadServer) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["bench", "serve", "--url", server.url, "--num-prompts", "2", "--max-new-tokens", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.stdout and "completed" in result.stdout
    result = runner.invoke(app, ["bench", "serve", "--url", server.url, "--api", "grpc"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["bench", "serve", "--url", server.url, "--slo", "ttft=1"])
    assert result.exit_code == 2
