"""The one async boundary: `AsyncEngine.generate(request)` streams `TokenEvent`s.

The engine core runs in its own thread, so the event loop never waits on a forward
pass. Each request gets an asyncio queue fed from that thread with one
`call_soon_threadsafe` per step; a consumer that stops iterating (client gone,
task cancelled) aborts its request, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from twinserve.config import EngineConfig
from twinserve.engine.engine import Engine
from twinserve.engine.request import GenerateRequest, TokenEvent
from twinserve.errors import EngineDeadError

log = logging.getLogger(__name__)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent]


class AsyncEngine:
    """Runs an `Engine` in a background thread and exposes async token streams."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config: EngineConfig = engine.config
        self._subscribers: dict[str, _Subscriber] = {}
        self._subs_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        engine.emit = self._dispatch

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model and build the engine (blocking: call before serving)."""
        from twinserve.engine.factory import build_engine

        return cls(build_engine(config))

    # ----------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="twinserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------- requests
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's token events; raises its error (ModelError, ...) in the stream.

        Validation and overload errors are raised before the first event, at once.
        """
        if self.dead_reason is not None:
            raise EngineDeadError(f"engine is dead: {self.dead_reason}")
        if self._thread is None:
            self.start()
        rid = request.request_id
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        with self._subs_lock:
            self._subscribers[rid] = sub
        finished = False
        try:
            self.engine.add_request(request)
            if self.dead_reason is not None:  # died between the check above and the add
                raise EngineDeadError(f"engine is dead: {self.dead_reason}")
            self._wake.set()
            while True:
                event = await sub.queue.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                if event.finished:
                    finished = True
                yield event
                if finished:
                    return
        finally:
            with self._subs_lock:
                self._subscribers.pop(rid, None)
            if not finished:
                self.engine.abort_request(rid)
                self._wake.set()

    async def generate_text(self, request: GenerateRequest) -> TokenEvent:
        """Run to completion and return the final event (generated_text, details)."""
        last: TokenEvent | None = None
        async for event in self.generate(request):
            last = event
        assert last is not None and last.finished
        return last

    # ----------------------------------------------------------- the thread
    def _dispatch(self, events: list[TokenEvent]) -> None:
        """Called in the engine thread after each forward: route events to their queues."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]] = {}
        with self._subs_lock:
            for event in events:
                sub = self._subscribers.get(event.request_id)
                if sub is not None:
                    by_loop.setdefault(sub.loop, []).append((sub.queue, event))
        for loop, items in by_loop.items():
            # RuntimeError: that event loop is closed; its consumers are gone
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.engine.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.engine.step()
        except BaseException as exc:  # the engine cannot continue: fail everyone, report it
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            log.critical("engine loop died: %s", self.dead_reason, exc_info=True)
            error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(self.dead_reason)
            try:
                self._dispatch(self.engine.fail_all(error))
            except Exception:  # pragma: no cover - best effort while dying
                log.exception("failing in-flight requests after engine death")


def _put_all(items: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
