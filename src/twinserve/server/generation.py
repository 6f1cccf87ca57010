"""One admitted request on its way out of the server: timings, metrics, disconnects.

Every route consumes the engine through `Generation`, so TTFT, inter-token latency,
success/failure counts and TGI's timing headers are measured in exactly one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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
        self._disconnect_watch: asyncio.Task[None] | None = None
        self.disconnected = False
        self._abort_recorded = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> TokenEvent:
        try:
            event = await self._stream.__anext__()
        except StopAsyncIteration:
            if self.final is None and self.error is None:  # closed before the end
                self._record_abort()
            raise
        except TwinserveError as exc:
            self.error = exc
            self._metrics.request_failed(exc.error_type)
            raise
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
        if self._disconnect_watch is not None:
            self._disconnect_watch.cancel()
        if self.final is None and self.error is None:
            self._stream.close()
            self._record_abort()

    def _record_success(self, event: TokenEvent) -> None:
        details = event.details
        self._metrics.request_succeeded(
            total_s=time.monotonic() - self.request.arrival_time,
            queue_s=event.queue_time or 0.0,
            inference_s=event.inference_time or 0.0,
            prompt_tokens=details.prompt_tokens if details else 0,
            generated_tokens=details.generated_tokens if details else self.tokens,
        )

    def _record_abort(self) -> None:
        if not self._abort_recorded:
            self._abort_recorded = True
            self._metrics.request_failed("cancelled")

    # ------------------------------------------------------------ unary use
    def watch_disconnect(self, receive: Receive) -> None:
        """Abort the generation as soon as the client disconnects (for non-streaming routes)."""

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    self._stream.close()
                    return

        self._disconnect_watch = asyncio.ensure_future(watch())

    async def result(self, receive: Receive | None = None) -> TokenEvent:
        """Run to the end and return the final event; ClientDisconnected if the client left."""
        if receive is not None:
            self.watch_disconnect(receive)
        try:
            async for _ in self:
                pass
        finally:
            if self._disconnect_watch is not None:
                self._disconnect_watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._disconnect_watch
        if self.final is None:
            raise ClientDisconnected()
        return self.final

    # --------------------------------------------------------------- report
    def timing_headers(self) -> dict[str, str]:
        """TGI's response headers (times in ms, compute time in s)."""
        final = self.final
        total = time.monotonic() - self.request.arrival_time
        headers = {"x-compute-time": f"{total:.6f}", "x-total-time": str(int(total * 1000))}
        if final is None:
            return headers
        queue = final.queue_time or 0.0
        inference = final.inference_time or 0.0
        details = final.details
        generated = details.generated_tokens if details else self.tokens
        headers.update(
            {
                "x-validation-time": "0",
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
            out["queue_ms"] = round((final.queue_time or 0.0) * 1000, 1)
            out["inference_ms"] = round((final.inference_time or 0.0) * 1000, 1)
        if self.error is not None:
            out["error_type"] = self.error.error_type
        if self.disconnected:
            out["disconnected"] = True
        return out
