"""`twinserve chat` against a running server, and `twinserve demo` end to end (tiny model)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tests.servers import serve_config, thread_server
from twinserve.cli.main import app


def test_chat_streams_an_answer_from_a_server(tiny_model_dir: Path) -> None:
    with thread_server(serve_config(tiny_model_dir, api_key="k")) as server:
        result = CliRunner().invoke(
            app, ["chat", "hello there", "--url", server.url, "--max-new-tokens", "5", "--api-key", "k"]
        )
        assert result.exit_code == 0, result.output
        assert "tokens, finish=" in result.output
        denied = CliRunner().invoke(app, ["chat", "hello", "--url", server.url])
        assert denied.exit_code == 1 and "API key" in denied.output


def test_chat_reports_an_unreachable_server() -> None:
    result = CliRunner().invoke(app, ["chat", "hi", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "error:" in result.output


def test_demo_serves_asks_and_stops(tiny_model_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["demo", "hello there", "--model", str(tiny_model_dir), "--max-new-tokens", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "serving" in result.output and "server stopped (exit 0)" in result.output
