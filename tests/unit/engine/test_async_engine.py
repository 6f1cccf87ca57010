"""The async boundary: streaming, cancellation, overload and engine death."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.factories import engine_config
from twinserve.engine.async_engine import ENGINE_DEAD, AsyncEngine
from twinserve.engine.engine import GENERATION_FAILED
from twinserve.engine.factory import build_engine
from twinserve.engine.request import GenerateRequest, SamplingParams
from twinserve.errors import EngineDeadError, ModelError, OverloadedError, ValidationError


@pytest.fixture()
def async_engine(tiny_model_dir: Path):
    engine = AsyncEngine(build_engine(engine_config(tiny_model_dir, max_concurrent_requests=4)))
    engine.start()
    yield engine
    engine.shutdown()


def req(max_new: int = 8, rid: str | None = None) -> GenerateRequest:
    kwargs = {"request_id": rid} if rid else {}
    return GenerateRequest(prompt="hello world", params=SamplingParams(max_new_tokens=max_new), **kwargs)


async def _collect(engine: AsyncEngine, request: GenerateRequest) -> list:
    return [e async for e in engine.generate(request)]


def test_streams_every_token_then_a_final_event(async_engine: AsyncEngine) -> None:
    async def main() -> list:
        return await asyncio.gather(*[_collect(async_engine, req(6)) for _ in range(3)])

    for events in asyncio.run(main()):
        assert len(events) == 6 and events[-1].finished and not any(e.finished for e in events[:-1])
        assert "".join(e.text for e in events) == events[-1].generated_text


def test_cancelling_the_consumer_aborts_the_request(async_engine: AsyncEngine) -> None:
    async def main() -> None:
        stream = async_engine.generate(req(200))
        async for _ in stream:
            break
        await stream.aclose()  # what a disconnected HTTP client does
        for _ in range(100):
            if async_engine.engine.num_in_flight == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("aborted request still in flight")

    asyncio.run(main())


def test_overload_and_validation_are_raised_at_once(async_engine: AsyncEngine) -> None:
    async def main() -> None:
        with pytest.raises(ValidationError):
            await _collect(
                async_engine, GenerateRequest(prompt="x", params=SamplingParams(max_new_tokens=999))
            )
        assert async_engine.engine.num_admitted == 0  # a refused request gives its place back
        streams = [async_engine.generate(req(200)) for _ in range(4)]
        firsts = [await s.__anext__() for s in streams]
        assert all(f.token is not None for f in firsts)
        # a full engine refuses before any validation work, as TGI's concurrency permit does
        with pytest.raises(OverloadedError):
            await asyncio.wait_for(_collect(async_engine, req(2)), timeout=5)
        for s in streams:
            await s.aclose()

    asyncio.run(main())


def test_engine_death_fails_requests_and_reports_unhealthy(async_engine: AsyncEngine) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert (simulated)")

    async_engine.engine.runner.execute = broken  # type: ignore[method-assign]

    async def main() -> None:
        # the request's own forward fails: it gets the generic error, never the device's message
        with pytest.raises(ModelError, match=f"^{re.escape(GENERATION_FAILED)}$"):
            await asyncio.wait_for(_collect(async_engine, req(4)), timeout=10)
        # then the engine's probe requests fail too: three failed forwards in a row, it gives up
        for _ in range(500):
            if not async_engine.is_healthy:
                break
            await asyncio.sleep(0.02)
        assert not async_engine.is_healthy
        assert async_engine.dead_reason is not None
        assert async_engine.dead_reason.startswith("EngineDeadError: 3 forward passes failed in a row")
        with pytest.raises(EngineDeadError, match=f"^{re.escape(ENGINE_DEAD)}$"):
            await _collect(async_engine, req(2))

    asyncio.run(main())


def test_launch_loads_and_steps_on_one_thread_and_call_runs_there(tiny_model_dir: Path) -> None:
    import threading

    engine = AsyncEngine.launch(engine_config(tiny_model_dir), warmup=False)
    try:
        engine_thread = engine.call(threading.current_thread)
        assert engine_thread is not threading.current_thread() and engine_thread.name == "twinserve-engine"
        events = asyncio.run(_collect(engine, req(4)))
        assert events[-1].finished and engine.is_healthy
        with pytest.raises(ZeroDivisionError):  # the caller gets fn's error; the engine goes on
            engine.call(lambda: 1 / 0)
        assert engine.call(lambda: 42) == 42 and engine.is_healthy
    finally:
        engine.shutdown()


def test_launch_raises_what_loading_raised(tmp_path: Path) -> None:
    from twinserve.errors import NotFoundError

    with pytest.raises(NotFoundError):
        AsyncEngine.launch(engine_config(tmp_path / "missing"))
