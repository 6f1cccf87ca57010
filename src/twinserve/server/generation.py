"""One admitted request on its way out of the server: timings, metrics, disconnects.

Every route consumes the engine through `Generation`, so TTFT, inter-token latency,
success/failure counts and TGI's timing headers are measured in exactly one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from twinserve.engine.async_engine import TokenStream
from twinserve.engine.request import GenerateRequest, SamplingParams, TokenEvent
from twinserve.errors import TwinserveError
from twinserve.server.metrics import ServerMetrics


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its generation was aborted."""


class Generation:
    """Async iterator over a request's events that records what happened to it."""

    def __init__(self, stream: TokenStream, request: GenerateRequest, metrics: ServerMetrics) -> None:
        self.request = request
        self.params: SamplingParams = request.params
        self._stream = stream
        self._metrics = metrics
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self._last_token_at: float | None = None
        self.final: TokenEvent | None = None
        self.error: TwinserveError | None = None
        self.tokens = 0
        self.disconnected = False
        self._abort_recorded = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> TokenEvent:
        event = await self.next_event()
        assert event is not None
        return event

    async def next_event(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event; None when none came within `timeout` seconds (still running)."""
        try:
            event = await self._stream.next_event(timeout)
        except StopAsyncIteration:
            if self.final is None and self.error is None:  # closed before the end
                self._record_abort()
            raise
        except TwinserveError as exc:
            self.error = exc
            self._metrics.request_failed(exc.error_type)
            raise
        if event is None:
            return None
        now = time.monotonic()
        if event.token is not None:
            self.tokens += 1
            if self.first_token_at is None:
                self.first_token_at = now
                self._metrics.time_to_first_token.observe(now - self.request.arrival_time)
            elif self._last_token_at is not None:
                self._metrics.inter_token_latency.observe(now - self._last_token_at)
            self._last_token_at = now
        if event.finished:
            self.final = event
            self._record_success(event)
        return event

    def close(self) -> None:
        """Abort if still running (idempotent)."""
        if self.final is None and self.error is None:
            self._stream.close()
            self._record_abort()

    def _queue_s(self, event: TokenEvent) -> float:
        """Time waiting for a batch, validation excluded (the engine counts from arrival)."""
        return max(0.0, (event.queue_time or 0.0) - (self.request.validation_time or 0.0))

    def _record_success(self, event: TokenEvent) -> None:
        details = event.details
        self._metrics.request_succeeded(
            total_s=time.monotonic() - self.request.arrival_time,
            validation_s=self.request.validation_time or 0.0,
            queue_s=self._queue_s(event),
            inference_s=event.inference_time or 0.0,
            prompt_tokens=details.prompt_tokens if details else 0,
            generated_tokens=details.generated_tokens if details else self.tokens,
        )

    def _record_abort(self) -> None:
        if not self._abort_recorded:
            self._abort_recorded = True
            self._metrics.request_failed("cancelled")

    def abort_for_disconnect(self) -> None:
        """The client left: stop the generation (a consumer waiting on it sees the end)."""
        self.disconnected = True
        self._stream.close()

    async def result(self, receive: Receive | None = None) -> TokenEvent:
        """Run to the end and return the final event; ClientDisconnected if the client left."""
        return (await results([self], receive))[0]

    async def _drain(self) -> TokenEvent | None:
        async for _ in self:
            pass
        return self.final

    # --------------------------------------------------------------- report
    def timing_headers(self) -> dict[str, str]:
        """TGI's response headers (times in ms, compute time in s)."""
        final = self.final
        total = time.monotonic() - self.request.arrival_time
        headers = {"x-compute-time": f"{total:.6f}", "x-total-time": str(int(total * 1000))}
        if final is None:
            return headers
        queue = self._queue_s(final)
        inference = final.inference_time or 0.0
        details = final.details
        generated = details.generated_tokens if details else self.tokens
        headers.update(
            {
                "x-validation-time": str(int((self.request.validation_time or 0.0) * 1000)),
                "x-queue-time": str(int(queue * 1000)),
                "x-inference-time": str(int(inference * 1000)),
                "x-time-per-token": str(int(inference * 1000 / max(generated, 1))),
                "x-prompt-tokens": str(details.prompt_tokens if details else 0),
                "x-generated-tokens": str(generated),
            }
        )
        return headers

    def summary(self) -> dict[str, Any]:
        """Sizes and timings for the access log (never the prompt or the text)."""
        final = self.final
        out: dict[str, Any] = {"engine_request_id": self.request.request_id, "generated_tokens": self.tokens}
        if self.first_token_at is not None:
            out["ttft_ms"] = round((self.first_token_at - self.request.arrival_time) * 1000, 1)
        if final is not None:
            if final.details is not None:
                out["prompt_tokens"] = final.details.prompt_tokens
                out["finish_reason"] = final.details.finish_reason.value
            out["validation_ms"] = round((self.request.validation_time or 0.0) * 1000, 1)
            out["queue_ms"] = round(self._queue_s(final) * 1000, 1)
            out["inference_ms"] = round((final.inference_time or 0.0) * 1000, 1)
        if self.error is not None:
            out["error_type"] = self.error.error_type
        if self.disconnected:
            out["disconnected"] = True
        return out


# ------------------------------------------------------------ several choices
async def results(generations: list[Generation], receive: Receive | None = None) -> list[TokenEvent]:
    """Run every generation to its end; the first error is raised. With `receive`, a client
    that disconnects aborts them all (one watcher: ASGI's receive takes one caller at a time),
    and ClientDisconnected is raised."""
    watch: asyncio.Future[None] | None = None
    if receive is not None:
        watch = asyncio.ensure_future(_watch_disconnect(receive, generations))
    try:
        if len(generations) == 1:
            finals = [await generations[0]._drain()]
        else:
            finals = list(await asyncio.gather(*(g._drain() for g in generations)))
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
    if any(final is None for final in finals):
        raise ClientDisconnected()
    return [final for final in finals if final is not None]


async def _watch_disconnect(receive: Receive, generations: list[Generation]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            for generation in generations:
                generation.abort_for_disconnect()
            return


async def merged(
    generations: list[Generation], keepalive_s: float | None = None
) -> AsyncIterator[tuple[int, TokenEvent] | None]:
    """The events of several generations as they come, each with its generation's index, and
    None whenever none came for `keepalive_s` seconds (a stream sends a keep-alive then).

    The first error is raised (the caller closes the others); closing the iterator stops the
    pumps. Waiting uses `asyncio.timeout` on a queue, never a task per event (the hot path).
    """
    if len(generations) == 1:
        generation = generations[0]
        while True:
            try:
                event = await generation.next_event(keepalive_s)
            except StopAsyncIteration:
                return
            yield None if event is None else (0, event)
    inbox: asyncio.Queue[tuple[int, TokenEvent | None, Exception | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation:
                inbox.put_nowait((index, event, None))
        except Exception as exc:
            inbox.put_nowait((index, None, exc))
            return
        inbox.put_nowait((index, None, None))

    pumps = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(pumps)
        while running:
            try:
                async with asyncio.timeout(keepalive_s):
                    index, item, error = await inbox.get()
            except TimeoutError:
                yield None
                continue
            if error is not None:
                raise error
            if item is None:
                running -= 1
                continue
            yield index, item
    finally:
        for task in pumps:
            task.cancel()
