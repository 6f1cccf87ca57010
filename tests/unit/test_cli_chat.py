"""`twinserve generate` on a local model, `twinserve chat` against a running server, and
`twinserve demo` end to end (tiny model)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tests.servers import serve_config, thread_server
from twinserve.cli import generate
from twinserve.cli.main import app
from twinserve.config import EngineConfig
from twinserve.engine.chat import chat_request
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams


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


def _engine_answer(model: Path, messages: list[dict[str, str]] | None, prompt: str) -> tuple[str, int, str]:
    """What the engine itself generates greedily (text, tokens, finish reason): the reference."""
    engine = build_engine(EngineConfig(model=str(model), dtype="float32"), warmup=False)
    params = SamplingParams(max_new_tokens=5)
    request = (
        chat_request(engine.tokenizer, messages, params)
        if messages
        else GenerateRequest(prompt=prompt, params=params, request_id="ref")
    )
    engine.add_request(request)
    events = []
    while engine.has_work():
        events += engine.step()
    last = events[-1]
    assert last.finished and last.finish_reason is not None
    return "".join(e.text for e in events), sum(e.token is not None for e in events), last.finish_reason.value


def test_generate_streams_the_engines_answer_to_stdout(tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(generate.err, "width", 250)  # the summary line on one line
    base = ["generate", "--model", str(tiny_model_dir), "--dtype", "float32", "--max-new-tokens", "5"]
    for extra, messages in [
        ([], None),
        (["--chat", "--system", "be brief"], [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]),
    ]:  # fmt: skip
        result = CliRunner().invoke(app, [*base, *extra, "hello there"])
        assert result.exit_code == 0, result.output
        text, tokens, reason = _engine_answer(tiny_model_dir, messages, "hello there")
        assert result.stdout == text + "\n"  # the answer alone on stdout, the summary on stderr
        assert f"{tokens} tokens, finish={reason}" in result.stderr


def test_generate_reports_a_bad_model_or_option_without_a_traceback(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "nope"), "hi"])
    assert missing.exit_code == 1 and "error:" in missing.stderr and "Traceback" not in missing.output
    bad = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "--dtype", "float8", "hi"])
    assert bad.exit_code == 2 and "dtype" in bad.stderr and "Traceback" not in bad.output
