"""SIGTERM on a real `twinserve serve` process: health turns 503 while the port stays open for
the grace period, in-flight work finishes, then the socket closes and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.faults import POISON, fault_env
from tests.servers import process_server

ARGS = ["--dtype", "float32", "--max-total-tokens", "4000", "--max-batch-total-tokens", "8000"]


def _stream_in_thread(url: str, max_new_tokens: int) -> tuple[threading.Thread, dict, threading.Event]:
    result: dict = {"events": [], "error": None}
    started = threading.Event()

    def run() -> None:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
        try:
            with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        result["events"].append(json.loads(line[5:]))
                        started.set()
        except Exception as exc:  # kept for the test: a thread's own error would go unseen
            result["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result, started


def test_sigterm_drains_in_flight_streams_then_exits_0(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), *ARGS, "--drain-timeout", "60"]
    with process_server(args, tmp_path / "serve.log") as server:
        thread, result, started = _stream_in_thread(server.url, 2500)
        assert started.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert server.proc.wait(60) == 0, server.log_path.read_text()
        thread.join(10)  # the server is gone: its stream has ended
        assert not thread.is_alive()
        assert result["error"] is None
        events = result["events"]
        assert len(events) == 2500 and events[-1]["generated_text"] is not None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
        log = server.log_path.read_text()
        assert "SIGTERM: draining" in log and '"status": 200' in log


def test_drain_is_bounded_by_the_timeout(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), *ARGS, "--drain-timeout", "0.2", "--drain-grace", "0"]
    with process_server(args, tmp_path / "serve.log") as server:
        thread, result, started = _stream_in_thread(server.url, 3900)
        assert started.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log_path.read_text()
        thread.join(30)
        assert not thread.is_alive()
        # cut off: the stream never got its final event, and broke as a connection does
        assert result["error"] is None or isinstance(result["error"], httpx.HTTPError), result["error"]
        assert not result["events"] or result["events"][-1]["generated_text"] is None


def test_the_port_answers_503_during_the_grace_period_then_closes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = ["--model", str(tiny_model_dir), *ARGS, "--drain-grace", "3"]
    with process_server(args, tmp_path / "serve.log") as server:
        server.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        seen: list[int] = []
        while time.monotonic() - sigterm_at < 1.5:  # well inside the grace period
            seen.append(httpx.get(f"{server.url}/health", timeout=2).status_code)
            time.sleep(0.1)
        ping = httpx.get(f"{server.url}/ping", timeout=2)
        refused = httpx.post(f"{server.url}/generate", json={"inputs": "hello"}, timeout=5)
        assert set(seen) == {503} and ping.status_code == 503
        assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
        assert refused.headers["retry-after"] == "1"
        assert server.proc.wait(30) == 0, server.log_path.read_text()
        assert time.monotonic() - sigterm_at >= 3  # the socket stayed open for the whole grace
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)


def test_a_model_that_cannot_load_makes_serve_exit_1_with_the_reason(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    with process_server(["--model", str(model)], tmp_path / "serve.log", wait=False) as server:
        assert server.proc.wait(120) == 1
        log = server.log_path.read_text()
        assert "model failed to load" in log and "pickle" in log.lower()


def test_a_poisoned_request_fails_alone_in_a_real_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), *ARGS]
    with process_server(args, tmp_path / "serve.log", env=fault_env("prefill")) as server:
        bad = httpx.post(f"{server.url}/generate", json={"inputs": f"{POISON} hi"}, timeout=30)
        good = httpx.post(
            f"{server.url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}, timeout=30
        )
        assert bad.status_code == 424 and bad.json() == {
            "error": "Request failed during generation",
            "error_type": "generation",
        }
        assert good.status_code == 200 and httpx.get(f"{server.url}/health").status_code == 200


def test_a_dead_engine_makes_the_server_exit_non_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), *ARGS, "--drain-grace", "0"]
    with process_server(args, tmp_path / "serve.log", env=fault_env("always")) as server:
        answer = httpx.post(f"{server.url}/generate", json={"inputs": "hi"}, timeout=30)
        # every forward fails, the probes after it too: the engine gives up and the process exits
        assert answer.status_code == 424 and answer.json()["error"] == "Request failed during generation"
        code = server.proc.wait(60)
        log = server.log_path.read_text()
        assert code == 1, log
        assert "engine died" in log and "injected" in log
