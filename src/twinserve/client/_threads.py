"""A blocking iterator consumed from asyncio: a thread runs it and feeds a queue.

botocore reads a response stream with blocking socket reads, so `astream` cannot iterate it
on the event loop. A daemon thread does (not the default executor: a stream may last minutes,
and `asyncio.run` would wait for it at exit), passing each item, then the end or the error,
through `call_soon_threadsafe`. The queue is unbounded: an LLM answer is small, and a
producer paced by token generation cannot outrun the consumer by much.

Stopping early (`aclose`) sets a flag the thread checks after each item; the thread then
closes the iterator and calls `on_stop` (closing the connection) itself, as the iterator is
not safe to touch from two threads. It notices at the next chunk, i.e. within a token or a
keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

_END = object()


class ThreadPump:
    """Items of `source` (run in a thread) as an async iterator, in order; errors re-raised."""

    def __init__(self, source: Generator[str, None, None], *, on_stop: Callable[[], Any]) -> None:
        self._source = source
        self._on_stop = on_stop
        self._stop = threading.Event()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.events = self._events()
        self._thread = threading.Thread(target=self._run, name="sagemaker-stream", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False
        return True

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set() or not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
        finally:
            with contextlib.suppress(Exception):
                self._source.close()
            with contextlib.suppress(Exception):
                self._on_stop()

    async def _events(self) -> AsyncGenerator[str, None]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        """Stop the thread at its next item (the connection closes from there) and the iterator."""
        self._stop.set()
        await self.events.aclose()
