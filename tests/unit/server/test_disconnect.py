"""A client that goes away stops its generation: streaming, unary, and while still queued."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.servers import ThreadServer, serve_config, thread_server

# long enough that it cannot finish before the client leaves (the tiny model is fast)
LONG = {"inputs": "hello", "parameters": {"max_new_tokens": 3900, "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path):
    config = serve_config(
        tiny_model_dir, max_total_tokens=4000, max_batch_total_tokens=8000, max_batch_size=1, warmup=False
    )
    with thread_server(config) as running:
        yield running


def _wait_idle(server: ThreadServer, timeout: float = 10.0) -> bool:
    core = server.service.engine.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if core.num_in_flight == 0:
            return True
        time.sleep(0.01)
    return False


def _cancelled(server: ThreadServer) -> float:
    for metric in server.service.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "tgi_request_failure" and sample.labels.get("err") == "cancelled":
                return sample.value
    return 0.0


def test_closing_a_stream_aborts_its_generation(server: ThreadServer) -> None:
    before = _cancelled(server)
    with httpx.stream("POST", f"{server.url}/generate_stream", json=LONG, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    assert _wait_idle(server)
    assert _cancelled(server) == before + 1


def test_a_unary_client_that_times_out_aborts_its_generation(server: ThreadServer) -> None:
    before = _cancelled(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json=LONG, timeout=httpx.Timeout(30, read=0.3))
    assert _wait_idle(server)
    assert _cancelled(server) == before + 1


def test_a_queued_request_is_dropped_when_its_client_leaves(server: ThreadServer) -> None:
    # max_batch_size=1: the second stream waits in the queue behind the first
    before = _cancelled(server)
    with httpx.stream("POST", f"{server.url}/generate_stream", json=LONG, timeout=30) as first:
        first_lines = first.iter_lines()  # kept: dropping the iterator would close the stream
        assert next(first_lines).startswith("data:")
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream(
                "POST", f"{server.url}/generate_stream", json=LONG, timeout=httpx.Timeout(30, read=0.3)
            ) as second,
        ):
            next(second.iter_lines())
        core = server.service.engine.engine
        deadline = time.monotonic() + 10
        while core.num_in_flight > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core.num_in_flight == 1  # only the running stream is left
    assert _wait_idle(server)
    assert _cancelled(server) == before + 2
