"""The client against a real server that fails in the middle of a stream.

The tiny model is served by uvicorn in a thread (tests.servers.thread_server); its engine's real
runner is wrapped (tests.faults.FaultyRunner) to fail the way a broken device does: a decode pass
raising (the engine contains it: that request fails with a 424) or a KV slot copy raising while
the batch compacts (it cannot: the engine dies and every stream in flight gets a 503). Which
attempts the client made is observed with `CountingTransport` over the real HttpTransport.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import POISON, FaultyRunner
from tests.servers import ThreadServer, serve_config, thread_server, until
from tests.unit.client.test_client_errors import FAST, counting_client
from twinserve.client import LLMClient, StreamChunk
from twinserve.engine.engine import Engine
from twinserve.engine.runner import Runner
from twinserve.engine.scheduler import SlotMove
from twinserve.errors import EngineDeadError, ModelError, NotReadyError

APIS = ["tgi", "openai"]


class BreakingDevice(FaultyRunner):
    """Poisoned rows fail their decode passes; once `break_copies` is set, slot copies fail too."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner, phase="decode")
        self.break_copies = False
        self.failed_copies = 0

    def move_slot(self, move: SlotMove) -> None:
        if self.break_copies:
            self.failed_copies += 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        super().move_slot(move)


def engine_of(server: ThreadServer) -> Engine:
    assert server.service.engine is not None
    return server.service.engine.engine


def install(server: ThreadServer) -> BreakingDevice:
    """Wrap the served engine's real runner (the engine thread is idle: nothing is in flight)."""
    engine = engine_of(server)
    device = BreakingDevice(engine.runner)
    engine.runner = device
    return device


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ThreadServer]:
    """A server whose engine survives its failures (poisoned decode passes only)."""
    with thread_server(serve_config(model_dir)) as s:
        install(s)
        yield s


@pytest.mark.parametrize("api", APIS)
def test_a_forward_pass_failing_mid_stream_raises_model_error_after_its_tokens(
    server: ThreadServer, api: str
) -> None:
    client, counted = counting_client(server.url, api, max_retries=3, **FAST)
    chunks: list[StreamChunk] = []
    with client, pytest.raises(ModelError) as info:  # noqa: PT012 - the chunks before it matter too
        # the prefill's token is sent; the first decode pass fails (logprobs: a chunk per token)
        for chunk in client.generate_stream(f"{POISON} hello", max_new_tokens=8, top_n_tokens=1):
            chunks.append(chunk)
    assert len(chunks) == 1 and not chunks[0].finished
    assert info.value.status_code == 424
    assert any(note.startswith("request_id: ") for note in info.value.__notes__)
    assert counted.statuses == [200]  # a 424 is not retried
    # the engine contained it: the next stream on the same server completes
    with LLMClient(server.url, api=api) as healthy:
        assert list(healthy.generate_stream("hello", max_new_tokens=3, ignore_eos=True))[-1].finished


LONG = {"max_new_tokens": 2000, "ignore_eos": True}


@pytest.mark.parametrize("api", APIS)
def test_an_engine_dying_mid_stream_is_raised_not_retried_but_a_queued_stream_is(
    model_dir: Path, api: str
) -> None:
    """A 503 is retryable, but not once chunks were delivered (a retry would repeat them); a
    stream whose first event is the 503 has delivered nothing, so it is retried."""
    cfg = serve_config(model_dir, max_batch_size=2, max_total_tokens=2048, max_batch_total_tokens=8192)
    with thread_server(cfg) as s, LLMClient(s.url, api=api, max_retries=0) as holder_client:
        engine, device = engine_of(s), install(s)
        holder = holder_client.generate_stream("hello", **LONG)
        next(holder)  # running in slot 0
        running, running_calls = counting_client(s.url, api, max_retries=3, **FAST)
        stream = running.generate_stream("once upon a time", **LONG)
        first = next(stream)  # running in slot 1, behind the holder
        queued, queued_calls = counting_client(s.url, api, max_retries=3, **FAST)
        outcome: list[BaseException] = []

        def wait_in_queue() -> None:
            try:
                list(queued.generate_stream("hi", max_new_tokens=4))
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread as is
                outcome.append(exc)

        waiter = threading.Thread(target=wait_in_queue, name="queued-stream")
        waiter.start()
        assert until(lambda: engine.num_waiting == 1)  # admitted, waiting for a batch slot
        device.break_copies = True
        holder.close()  # the holder leaves slot 0: moving slot 1 into it breaks the device
        rest: list[StreamChunk] = []
        with pytest.raises(EngineDeadError) as info:  # noqa: PT012 - the chunks before it matter too
            for chunk in stream:
                rest.append(chunk)
        waiter.join(60)
        assert not waiter.is_alive()
        running.close()
        queued.close()
    assert device.failed_copies == 1
    assert not first.finished and not any(c.finished for c in rest)
    assert info.value.status_code == 503
    assert running_calls.statuses == [200]  # not retried after its chunks
    # the queued stream: its 200 carried only the error, so it was retried (the dead server: 503s)
    assert queued_calls.statuses == [200, 503, 503, 503]
    # what the last 503 answer maps to (docs/client.md): TGI's body says the engine is dead;
    # OpenAI's says only "service_unavailable", so the status decides
    assert len(outcome) == 1
    assert type(outcome[0]) is (EngineDeadError if api == "tgi" else NotReadyError), repr(outcome[0])
