"""SIGTERM on a real `twinserve serve` process: stop accepting, finish in-flight work, exit 0."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import httpx
import pytest

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
        except httpx.HTTPError as exc:
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
        assert result["error"] is None
        events = result["events"]
        assert len(events) == 2500 and events[-1]["generated_text"] is not None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
        log = server.log_path.read_text()
        assert "SIGTERM: draining" in log and '"status": 200' in log


def test_drain_is_bounded_by_the_timeout(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), *ARGS, "--drain-timeout", "0.2"]
    with process_server(args, tmp_path / "serve.log") as server:
        thread, result, started = _stream_in_thread(server.url, 3900)
        assert started.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log_path.read_text()
        thread.join(30)
        # cut off: the stream never got its final event
        assert not result["events"] or result["events"][-1]["generated_text"] is None


def test_a_model_that_cannot_load_makes_serve_exit_1_with_the_reason(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    with process_server(["--model", str(model)], tmp_path / "serve.log", wait=False) as server:
        assert server.proc.wait(120) == 1
        log = server.log_path.read_text()
        assert "model failed to load" in log and "pickle" in log.lower()
