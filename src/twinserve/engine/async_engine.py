"""The one async boundary: `AsyncEngine.generate(request)` streams `TokenEvent`s.

The engine core runs in its own thread, so the event loop never waits on a forward
pass. `launch` also loads the model on that thread, and `call` runs other torch work
there (a benchmark's baseline): torch's OpenMP pool belongs to the thread that first
runs a parallel op, and once two threads own one on a machine with as many cores as
threads, libgomp stops spin-waiting and every op pays a futex sleep and wake-up
(~20% of a single-stream decode step on 2 cores).

Each request gets an asyncio queue fed from that thread with one
`call_soon_threadsafe` per step; a consumer that stops iterating (client gone,
task cancelled) aborts its request, which frees its slot at the next step.

Tokenizing and validating a request runs on a small pool of validation threads
(`validation_workers`, as TGI's), never on the event loop: a 2 MB prompt takes a second
to tokenize, and the loop must keep streaming other requests' tokens meanwhile. The
HF tokenizer releases the GIL while it encodes, so those threads run beside the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from twinserve.config import EngineConfig
from twinserve.engine.engine import Engine
from twinserve.engine.request import GenerateRequest, TokenEvent
from twinserve.engine.state import RequestState
from twinserve.errors import EngineDeadError

log = logging.getLogger(__name__)

# what clients and health checks see of a dead engine (the reason itself goes to the log)
ENGINE_DEAD = "the engine stopped after repeated failures and cannot serve requests"

T = TypeVar("T")


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | None]


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
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = queue.SimpleQueue()
        self._validators = ThreadPoolExecutor(
            max_workers=engine.config.validation_workers, thread_name_prefix="twinserve-validate"
        )
        self.dead_reason: str | None = None
        # called once, from the engine thread, when the engine dies (a server exits on it)
        self.on_dead: Callable[[str], None] | None = None
        engine.emit = self._dispatch

    @classmethod
    def launch(cls, config: EngineConfig, *, warmup: bool = True) -> AsyncEngine:
        """Load the model on a new engine thread and serve from it; blocks until loaded.

        Raises what loading raised (ModelLoadError, ...). All torch work of the engine then
        happens on that one thread, so it owns the process's only OpenMP pool.
        """
        from twinserve.engine.factory import build_engine

        built: Future[AsyncEngine] = Future()

        def main() -> None:
            try:
                async_engine = cls(build_engine(config, warmup=warmup))
                async_engine._thread = threading.current_thread()
            except BaseException as exc:
                built.set_exception(exc)
                return
            built.set_result(async_engine)
            async_engine._loop()

        threading.Thread(target=main, name="twinserve-engine", daemon=True).start()
        return built.result()

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
        self._validators.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run CPU-bound request work (tokenizing, rendering a chat template) on a validation thread."""
        return await asyncio.get_running_loop().run_in_executor(self._validators, fn)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps and return its result (blocking).

        For torch work that must not start a second OpenMP pool (see the module docstring).
        """
        if self._thread is None:
            self.start()
        thread = self._thread
        assert thread is not None
        if threading.current_thread() is thread:
            return fn()
        if self.dead_reason is not None:
            raise EngineDeadError(ENGINE_DEAD)
        done: Future[object] = Future()
        self._calls.put((fn, done))
        self._wake.set()
        if not thread.is_alive():  # stopped or died meanwhile: nobody will run it
            self._cancel_calls()
        return done.result()  # type: ignore[return-value]

    @property
    def is_healthy(self) -> bool:
        return self.dead_reason is None and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------- requests
    async def submit(self, request: GenerateRequest) -> TokenStream:
        """Admit a request and return its event stream (call from the event loop).

        Overload, validation and dead-engine errors are raised here, before any event, so a
        server can answer 429/422/503 with a status code instead of inside a started stream.
        Validation runs on a validation thread; `request.validation_time` records how long.
        """
        self._check_alive()
        self.engine.reserve()  # overload is answered before any tokenizing work
        started = time.monotonic()
        try:
            state = await self.off_loop(lambda: self.engine.validate(request))
        except BaseException:
            self.engine.unreserve()
            raise
        request.validation_time = time.monotonic() - started
        return self._enqueue(state)

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(ENGINE_DEAD)
        if self._thread is None:
            self.start()

    def _enqueue(self, state: RequestState) -> TokenStream:
        rid = state.request_id
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue())
        with self._subs_lock:
            self._subscribers[rid] = sub
        try:
            self.engine.enqueue(state)
        except BaseException:
            with self._subs_lock:
                self._subscribers.pop(rid, None)
            raise
        stream = TokenStream(self, rid, sub.queue)
        if self.dead_reason is not None:  # died between the check and the enqueue
            stream.close()
            raise EngineDeadError(ENGINE_DEAD)
        self._wake.set()
        return stream

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Stream the request's token events; raises its error (ModelError, ...) in the stream."""
        stream = await self.submit(request)
        try:
            async for event in stream:
                yield event
        finally:
            stream.close()

    async def generate_text(self, request: GenerateRequest) -> TokenEvent:
        """Run to completion and return the final event (generated_text, details)."""
        last: TokenEvent | None = None
        async for event in self.generate(request):
            last = event
        assert last is not None and last.finished
        return last

    def _release(self, request_id: str, *, abort: bool) -> None:
        with self._subs_lock:
            self._subscribers.pop(request_id, None)
        if abort:
            self.engine.abort_request(request_id)
            self._wake.set()

    # ----------------------------------------------------------- the thread
    def _dispatch(self, events: list[TokenEvent]) -> None:
        """Called in the engine thread after each forward: route events to their queues."""
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[TokenEvent | None], TokenEvent]]
        ] = {}
        with self._subs_lock:
            for event in events:
                sub = self._subscribers.get(event.request_id)
                if sub is not None:
                    by_loop.setdefault(sub.loop, []).append((sub.queue, event))
        for loop, items in by_loop.items():
            # RuntimeError: that event loop is closed; its consumers are gone
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    def _run_calls(self) -> None:
        while not self._calls.empty():
            fn, done = self._calls.get()
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except BaseException as exc:  # the caller gets it; the engine goes on
                    done.set_exception(exc)

    def _cancel_calls(self) -> None:
        while not self._calls.empty():
            _, done = self._calls.get()
            if done.set_running_or_notify_cancel():
                done.set_exception(EngineDeadError("the engine thread has stopped"))

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._run_calls()
                if not self.engine.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    self.engine.release_if_idle()
                    continue
                self.engine.step()
        except BaseException as exc:  # the engine cannot continue: fail everyone, report it
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            log.critical("engine loop died: %s", self.dead_reason, exc_info=True)
            try:
                self._dispatch(self.engine.fail_all(EngineDeadError(ENGINE_DEAD)))
            except Exception:  # pragma: no cover - best effort while dying
                log.exception("failing in-flight requests after engine death")
            if self.on_dead is not None:
                self.on_dead(self.dead_reason)
        finally:
            self._cancel_calls()


def _put_all(items: list[tuple[asyncio.Queue[TokenEvent | None], TokenEvent]]) -> None:
    for events, event in items:
        events.put_nowait(event)


class TokenStream:
    """The events of one admitted request; closing it before the end aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue[TokenEvent | None]) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue = queue
        self._done = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        event = await self.next_event()
        assert event is not None
        return event

    async def next_event(self, timeout: float | None = None) -> TokenEvent | None:
        """The next event, or None when none came within `timeout` seconds (the request goes on:
        a server sends a keep-alive then). StopAsyncIteration at the end, as `__anext__`."""
        if self._done:
            raise StopAsyncIteration
        try:
            if timeout is None:
                event = await self._queue.get()
            else:
                try:
                    async with asyncio.timeout(timeout):  # a cancelled queue get loses nothing
                        event = await self._queue.get()
                except TimeoutError:
                    return None
        except BaseException:  # cancelled while waiting: the consumer is gone
            self.close()
            raise
        if event is None:  # closed (e.g. by a disconnect watcher) while a consumer waited
            raise StopAsyncIteration
        if event.error is not None:
            self._finish()
            raise event.error
        if event.finished:
            self._finish()
        return event

    def _finish(self) -> None:
        self._done = True
        self._engine._release(self.request_id, abort=False)

    def close(self) -> None:
        """Stop listening; aborts the request if it has not finished (idempotent)."""
        if not self._done:
            self._done = True
            self._engine._release(self.request_id, abort=True)
            self._queue.put_nowait(None)  # wakes a consumer waiting on an event that won't come
