"""`bench prefix` on the tiny model: one small run through the CLI, its report self-consistent
(no timing asserts: only what the cache must and must not have served)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twinserve.bench.prefix_bench import PrefixBenchConfig, PrefixBenchReport, arrangements, user_turn
from twinserve.cli.bench import _print_prefix_report
from twinserve.cli.main import app


def test_arrangements_and_turns() -> None:
    cfg = PrefixBenchConfig(model="m", shared_requests=10, wave_size=4)
    assert arrangements(cfg) == [("10 at once", [10]), ("waves of 4", [4, 4, 2]), ("1 then 9", [1, 9])]
    assert arrangements(cfg.model_copy(update={"shared_requests": 1})) == [
        ("1 at once", [1]),
        ("waves of 4", [1]),
    ]
    assert user_turn(0, 0) != user_turn(1, 0) and user_turn(0, 1) != user_turn(0, 0)


def test_unknown_part_is_refused_before_any_server_starts() -> None:
    result = CliRunner().invoke(app, ["bench", "prefix", "--model", "m", "--only", "chat,nope"])
    assert result.exit_code == 2 and "nope" in result.output


def test_small_run_is_consistent(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "prefix", "--model", str(tiny_model_dir), "--dtype", "float32", "--json"]
    args += ["--conversations", "2", "--turns", "2", "--max-new-tokens", "4"]
    args += ["--shared-requests", "4", "--wave-size", "2", "--context-tokens", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = PrefixBenchReport.model_validate(json.loads(result.stdout[result.stdout.index("{") :]))

    # greedy fp32: the cache changes the time an answer takes, never the answer
    assert report.mismatches == report.mismatches_with_hit == 0 and report.mismatch_examples == []
    assert report.requests_compared == 2 * 2 + 3 * 4
    chat = report.chat
    assert chat is not None and [t.turn for t in chat.turns] == [1, 2]
    assert [t.first for t in chat.turns] == ["cache", "no-cache"]  # the first side alternates
    first, second = chat.turns
    # turn 1: only the system prompt the conversations share can hit (a conversation that arrives a
    # step after another finds it cached); the warm-up shares nothing with them
    assert first.cache.cached_tokens < first.cache.prompt_tokens / 2
    assert second.cache.cached_tokens > first.cache.prompt_tokens / 2  # turn 2 re-sends turn 1
    assert chat.cache.prompt_tokens == chat.no_cache.prompt_tokens  # the same histories
    assert (chat.cache.requests, chat.no_cache.requests) == (4, 4)
    assert (chat.compared, chat.diverged) == (4, 0)  # equal answers, so equal histories
    assert chat.later_turns_ttft_p50_ratio is not None and chat.later_turns_ttft_p50_ratio > 0

    shared = {a.name: a for a in report.shared}
    assert list(shared) == ["4 at once", "waves of 2", "1 then 3"]
    assert shared["waves of 2"].cache.cached_tokens >= 2 * 64  # the second wave reuses the passage
    assert shared["1 then 3"].cache.cached_tokens >= 3 * 64
    for a in report.shared:
        assert 64 <= a.context_tokens < 64 + 8
        assert a.cache.prompt_tokens == a.no_cache.prompt_tokens
    for side in [chat.cache, *(a.cache for a in report.shared)]:
        # usage and /metrics tell the same story: one lookup per request, the same hits
        assert side.metrics.queries == side.requests
        assert side.metrics.queried_tokens == side.prompt_tokens
        assert side.metrics.hit_tokens == side.cached_tokens
    for side in [chat.no_cache, *(a.no_cache for a in report.shared)]:
        assert side.cached_tokens == 0 and side.computed_share == 1.0
        assert side.metrics.queries == side.metrics.hit_tokens == 0
    rows = {measure: met for measure, _, _, met in report.summary()}
    assert rows["outputs differing, cache vs none"] is True
    assert "chat: TTFT p50, cache ÷ none" in rows and "shared, waves of 2: prefill computed" in rows

    # the tables print from the same report (what the command shows without --json)
    capsys.readouterr()
    _print_prefix_report(report)
    shown = capsys.readouterr().out
    assert "multi-turn chat" in shown and "waves of 2" in shown and "meets" in shown
