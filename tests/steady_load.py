"""Background load for no-dropped-request tests (updates, scaling): clients that keep sending
TGI requests, half of them streamed, and record every outcome."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import httpx


class SteadyLoad:
    """Background clients sending requests through the router until stopped; counts every outcome.

    Any exception, a non-200 or a body that is not a finished generation is a failure with its
    description; `check` also fails when a client thread did not send requests to the end.
    """

    BODY: ClassVar[dict[str, Any]] = {"inputs": "hello there", "parameters": {"max_new_tokens": 8}}

    def __init__(self, url: str, clients: int = 3, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.ok = 0
        self.failures: list[str] = []
        self.replicas: list[str] = []
        self.served = [0] * clients  # requests each client had answered in full
        self.finished = [False] * clients  # each client's loop ran until stop (did not die)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def check(self, max_failures: int = 0) -> None:
        """Every client ran to the end and had requests served; at most `max_failures` of them failed."""
        assert not any(t.is_alive() for t in self._threads), "a client still runs after the load stopped"
        assert self.finished == [True] * len(self._threads), f"a client died: {self.failures}"
        assert all(n > 0 for n in self.served), (
            f"a client had no request served: {self.served} {self.failures[:5]}"
        )
        assert len(self.failures) <= max_failures, self.failures

    def _run(self, i: int) -> None:
        try:
            with httpx.Client(timeout=60, headers=self.headers) as client:
                while not self._stop.is_set():
                    try:
                        # half stream: a stream cut short by an update counts as a failure
                        replica, problem = self._stream(client) if i % 2 else self._generate(client)
                    except Exception as exc:  # whatever it is, the request was dropped
                        replica, problem = None, f"{type(exc).__name__}: {exc}"
                    if problem is None:
                        self.ok += 1
                        self.served[i] += 1
                        self.replicas.append(replica or "?")
                    else:
                        self.failures.append(problem)
        except BaseException as exc:  # recorded, and `finished` stays False
            self.failures.append(f"client {i} died: {type(exc).__name__}: {exc}")
            return
        self.finished[i] = True

    def _generate(self, client: httpx.Client) -> tuple[str | None, str | None]:
        r = client.post(f"{self.url}/generate", json=self.BODY)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        if (
            r.status_code != 200
            or not isinstance(body, dict)
            or not isinstance(body.get("generated_text"), str)
        ):
            return None, f"/generate {r.status_code}: {r.text[:200]}"
        return r.headers.get("x-twinserve-replica"), None

    def _stream(self, client: httpx.Client) -> tuple[str | None, str | None]:
        with client.stream("POST", f"{self.url}/generate_stream", json=self.BODY) as r:
            text = r.read().decode()
        events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
        finished = (
            bool(events)
            and all(isinstance(e, dict) and "error" not in e for e in events)
            and all(e.get("generated_text") is None for e in events[:-1])
            and isinstance(events[-1].get("generated_text"), str)
        )
        if r.status_code != 200 or not finished:
            return None, f"/generate_stream {r.status_code}: {text[-200:]}"
        return r.headers.get("x-twinserve-replica"), None


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)
