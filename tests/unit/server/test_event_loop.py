"""A huge prompt is tokenized off the event loop: while it validates, other streams keep
getting their tokens and `/health` keeps answering (a real `twinserve serve` process)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx

from tests.factories import CORPUS
from tests.servers import process_server

ARGS = [
    "--dtype", "float32", "--max-total-tokens", "4000", "--max-batch-total-tokens", "8000",
    "--payload-limit", "5000000",
]  # fmt: skip


def test_a_2mb_prompt_does_not_stall_other_streams_or_health(tiny_model_dir: Path, tmp_path: Path) -> None:
    big_prompt = (" ".join(CORPUS) + " ") * 20
    big_prompt = (big_prompt * (2_000_000 // len(big_prompt) + 1))[:2_000_000]
    arrivals: list[float] = []
    streaming = threading.Event()
    with process_server(["--model", str(tiny_model_dir), *ARGS], tmp_path / "serve.log") as server:
        thread_errors: list[str] = []  # an exception in a thread would otherwise go unseen
        big_done = threading.Event()

        def stream() -> None:
            """Streams back to back until a few tokens arrived after the big request: on a loaded
            machine its validation can outlast one whole stream."""
            body = {"inputs": "hello", "parameters": {"max_new_tokens": 3900, "ignore_eos": True}}
            after_big = 0
            try:
                while after_big < 5:
                    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=120) as r:
                        for line in r.iter_lines():
                            if line.startswith("data:") and json.loads(line[5:]).get("token"):
                                arrivals.append(time.monotonic())
                                streaming.set()
                                after_big += big_done.is_set()
                                if after_big >= 5:
                                    break
            except Exception as exc:
                thread_errors.append(f"stream: {type(exc).__name__}: {exc}")

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert streaming.wait(60)
        health_latencies: list[float] = []

        def probe() -> None:
            try:
                with httpx.Client(timeout=30) as client:
                    while not big_done.is_set():
                        started = time.monotonic()
                        status = client.get(f"{server.url}/health").status_code
                        if status != 200:
                            thread_errors.append(f"/health answered {status}")
                            return
                        health_latencies.append(time.monotonic() - started)
                        time.sleep(0.02)
            except Exception as exc:
                thread_errors.append(f"probe: {type(exc).__name__}: {exc}")

        prober = threading.Thread(target=probe)
        prober.start()
        started = time.monotonic()
        big = httpx.post(f"{server.url}/generate", json={"inputs": big_prompt}, timeout=120)
        finished = time.monotonic()
        big_done.set()
        prober.join(30)
        streamer.join(120)
        assert not prober.is_alive() and not streamer.is_alive()
        assert thread_errors == []

    validation_s = finished - started
    assert big.status_code == 422 and "`inputs` must have less than" in big.json()["error"]
    # the tokens during the big request, with the last one before it and the first one after
    first = max(i for i, t in enumerate(arrivals) if t < started)
    last = min(i for i, t in enumerate(arrivals) if t > finished)
    during = arrivals[first : last + 1]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert len(during) > 10, "the stream paused while the big prompt was validated"
    # the stream and the probes move on their own time scale, far below the big prompt's
    assert max(gaps) < validation_s / 4, (max(gaps), validation_s)
    assert health_latencies and max(health_latencies) < validation_s / 4, (
        max(health_latencies),
        validation_s,
    )
