"""`twinserve bench endpoint`: what a local real-time endpoint costs, and how it behaves under change.

Three parts, each on its own endpoint in a temporary state folder (a `StateStore` and a
`LocalRuntime` of their own, so the user's endpoints are never touched), each endpoint deleted
when its part ends — errors, Ctrl-C and SIGTERM included, so no replica, router or controller
outlives the run:

- router: W{concurrency} (chat conversations, streaming, `max_new_tokens` each, greedy,
  `ignore_eos`) sent through the router and straight to its only replica, alternately; the
  side that goes first alternates per round, so the machine's drift hits both. tok/s and p50
  TTFT per side, the median router ÷ direct ratio (goal ≥ 0.95: the router costs ≤ 5%).
- update: clients loop on `/generate` and `/generate_stream` (half each) while a blue/green
  update to the same model runs; a request fails when it is not a whole 200 answer (another
  status, a stream cut short or carrying an error event, a connection error). Goal: 0 failed.
- scale: target tracking (`scale_target` requests per replica, 1..2 replicas, lookback 5 s,
  scale-out cooldown 5 s) with the endpoint's controller running; `burst` streaming clients
  start at once and keep streaming. Seconds from the burst to `describe` showing 2 healthy
  replicas, split by the scaling event's time (the decision) and the new replica's start time
  (wall clock, UTC, for all three).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, computed_field

from twinserve.bench.interrupts import sigterm_interrupts
from twinserve.bench.prompts import QUESTIONS, chat_messages
from twinserve.bench.serve_bench import ServeBenchConfig, chat_workload, serve_bench
from twinserve.config import Dtype
from twinserve.deploy.spec import Endpoint, EndpointConfig, utcnow
from twinserve.deploy.state import StateStore
from twinserve.platforms.local.local_runtime import LocalRuntime
from twinserve.platforms.local.platform import LocalPlatform
from twinserve.platforms.local.router.app import REPLICA_HEADER

Progress = Callable[[str], None]
Part = Literal["router", "update", "scale"]
PARTS: tuple[Part, ...] = ("router", "update", "scale")

ROUTER_GOAL = 0.95  # router ÷ direct throughput: the router may cost at most 5%
_POLL_S = 0.2


def _quiet(_: str) -> None:
    """The default progress callback: say nothing."""


class EndpointBenchConfig(BaseModel):
    """One `bench endpoint` run."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Registry reference or model folder every replica serves.")
    dtype: Dtype = Field("auto", description="Replica dtype; auto = bf16 where fast, as `serve`.")
    threads: int | None = Field(None, ge=1, description="CPU threads per replica; None = all cores.")
    rounds: int = Field(3, ge=1, description="Router part: interleaved router/direct rounds.")
    concurrency: int = Field(32, ge=1, description="Router part: requests in flight (W32).")
    max_new_tokens: int = Field(128, ge=2, description="Tokens per request (router and scale parts).")
    parts: list[Part] = Field(default_factory=lambda: list(PARTS), min_length=1, description="Parts to run.")
    update_clients: int = Field(4, ge=1, description="Update part: clients looping during the update.")
    update_max_new_tokens: int = Field(16, ge=1, description="Update part: tokens per request.")
    burst: int = Field(16, ge=1, description="Scale part: streaming clients that start at once.")
    scale_target: float = Field(4.0, gt=0, description="Scale part: concurrent requests per replica.")
    scale_timeout_s: float = Field(300.0, gt=0, description="Scale part: give up on a scale-out after this.")
    drain_timeout_s: float = Field(10.0, ge=0, description="Drain timeout of the benchmark's endpoints.")
    platform: Literal["local", "ray"] = Field(
        "local", description="ray: the router part measures Serve's proxy instead (the only part run)."
    )
    ray_address: str = Field(
        "auto", min_length=1, description="platform ray: the cluster (`ray start --head`)."
    )


# ------------------------------------------------------------------ results
class SideResult(BaseModel):
    tokens_per_s: float
    ttft_ms_p50: float


class RouterRound(BaseModel):
    first: Literal["router", "direct"] = Field(description="The side measured first in this round.")
    router: SideResult
    direct: SideResult

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ratio(self) -> float:
        """Router ÷ direct output tokens/s."""
        return self.router.tokens_per_s / self.direct.tokens_per_s


class RouterResult(BaseModel):
    model_version: str | None = Field(description="What the replica reported serving.")
    rounds: list[RouterRound]
    ratio_median: float = Field(description="Median over rounds of router ÷ direct tokens/s.")
    router_ttft_ms_p50: float = Field(description="Median over rounds of the router side's p50 TTFT.")
    direct_ttft_ms_p50: float = Field(description="Median over rounds of the direct side's p50 TTFT.")
    goal: float = ROUTER_GOAL


class UpdateResult(BaseModel):
    update_s: float = Field(description="How long `LocalPlatform.update` took.")
    clients: int
    ok: int = Field(description="Whole 200 answers while the clients ran (before, during, after the update).")
    failed: int = Field(description="Everything else: other statuses, broken streams, connection errors.")
    ok_during_update: int = Field(description="Requests that overlapped the update and succeeded.")
    failed_during_update: int
    failures: dict[str, int] = Field(description="Failed requests by kind.")
    first_failures: list[str] = Field(description="The first few failure messages.")
    served_by: dict[str, int] = Field(description="Successful requests per generation (blue 1, green 2).")
    versions: tuple[str | None, str | None] = Field(description="model_version before and after.")
    generation: int = Field(description="The serving generation after the update.")


class ScaleResult(BaseModel):
    burst: int
    seconds_to_healthy: float | None = Field(description="Burst start → describe shows 2 healthy replicas.")
    decision_s: float | None = Field(description="Burst start → the scale-out event (the decision).")
    replica_started_s: float | None = Field(description="Burst start → the new replica's process started.")
    replica_start_s: float | None = Field(description="The new replica's process start → healthy.")
    first_answer_s: float | None = Field(description="Burst start → the first answer from the new replica.")
    event_reason: str | None
    metric_value: float | None
    ok: int
    failed: int
    failures: dict[str, int]


class EndpointBenchReport(BaseModel):
    config: EndpointBenchConfig
    started_at: datetime
    cpu_count: int | None
    router: RouterResult | None = None
    update: UpdateResult | None = None
    scale: ScaleResult | None = None
    errors: dict[str, str] = Field(default_factory=dict, description="Parts that failed, and why.")

    def summary(self) -> list[tuple[str, str, str, bool | None]]:
        """(measure, value, goal, met) rows for a table; `met` None where there is no goal."""
        rows: list[tuple[str, str, str, bool | None]] = []
        if (r := self.router) is not None:
            hop = "Serve proxy" if self.config.platform == "ray" else "router"
            rows.append(
                (
                    f"{hop} ÷ direct tok/s (median)",
                    f"{r.ratio_median:.3f}",
                    f"≥ {r.goal}",
                    r.ratio_median >= r.goal,
                )
            )
            ttft = f"{r.router_ttft_ms_p50:.0f} ms vs {r.direct_ttft_ms_p50:.0f} ms"
            rows.append((f"TTFT p50 {hop} vs direct", ttft, "", None))
        if (u := self.update) is not None:
            rows.append(
                ("failed requests during the update", f"{u.failed} of {u.ok + u.failed}", "0", u.failed == 0)
            )
            served = ", ".join(f"gen {g}: {n}" for g, n in sorted(u.served_by.items()))
            rows.append(("update duration (served by)", f"{u.update_s:.1f} s ({served})", "", None))
        if (s := self.scale) is not None:
            rows.append(("burst → 2 healthy replicas", _seconds(s.seconds_to_healthy), "", None))
            rows.append(("  burst → scaling decision", _seconds(s.decision_s), "", None))
            rows.append(("  burst → replica process started", _seconds(s.replica_started_s), "", None))
            rows.append(("  replica start → healthy", _seconds(s.replica_start_s), "", None))
            rows.append(("  burst → first answer from it", _seconds(s.first_answer_s), "", None))
            rows.append(("failed requests during the burst", f"{s.failed} of {s.ok + s.failed}", "", None))
        return rows


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


# ------------------------------------------------------------------ load clients
@dataclass(frozen=True)
class Outcome:
    """One request of a load client; times are monotonic seconds."""

    start: float
    end: float
    answered: float | None  # the status line arrived
    replica: str | None  # the router's x-twinserve-replica header
    error: str | None = None  # kind of failure; None = a whole 200 answer
    detail: str = ""


class LoadClients:
    """Threads sending requests back to back through one URL until stopped; every outcome is kept.

    `streaming="half"`: odd clients stream (`/generate_stream`), even ones do not (`/generate`);
    "all": every client streams.
    """

    def __init__(
        self, url: str, clients: int, max_new_tokens: int, *, streaming: Literal["half", "all"] = "half"
    ) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []  # list.append is atomic: threads share it without a lock
        self._params = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
        self._streaming = streaming
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"bench-load-{i}", daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> LoadClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def ok_count(self, since: float = float("-inf")) -> int:
        return sum(o.error is None and o.start >= since for o in self.outcomes)

    def wait_ok(self, n: int, timeout: float, since: float = float("-inf")) -> None:
        """Until `n` requests started after `since` succeeded; TimeoutError otherwise."""
        _wait(lambda: self.ok_count(since) >= n, timeout, f"{n} successful requests")

    def _run(self, i: int) -> None:
        stream = self._streaming == "all" or i % 2 == 1
        with httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0)) as client:
            n = 0
            while not self._stop.is_set():
                body = {"inputs": QUESTIONS[(i + n) % len(QUESTIONS)], "parameters": self._params}
                self.outcomes.append(_request(client, self.url, body, stream))
                n += 1


def _request(client: httpx.Client, url: str, body: dict[str, Any], stream: bool) -> Outcome:
    start = time.monotonic()
    answered: float | None = None
    replica: str | None = None
    try:
        if stream:
            with client.stream("POST", f"{url}/generate_stream", json=body) as r:
                answered, replica = time.monotonic(), r.headers.get(REPLICA_HEADER)
                text = r.read().decode(errors="replace")
            error, detail = (None, "") if r.status_code == 200 else (f"HTTP {r.status_code}", text)
            if error is None:
                error, detail = _stream_error(text)
        else:
            r = client.post(f"{url}/generate", json=body)
            answered, replica = time.monotonic(), r.headers.get(REPLICA_HEADER)
            whole = r.status_code == 200 and isinstance(r.json().get("generated_text"), str)
            error, detail = (None, "") if whole else (f"HTTP {r.status_code}", r.text)
    except httpx.HTTPError as exc:
        error, detail = type(exc).__name__, str(exc)
    except ValueError as exc:  # a 200 whose body is not the JSON it should be
        error, detail = "invalid body", str(exc)
    return Outcome(start, time.monotonic(), answered, replica, error, detail[:300])


def _stream_error(text: str) -> tuple[str | None, str]:
    """A TGI stream is whole when no event carries an error and the last one has the text."""
    last: dict[str, Any] | None = None
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[len("data:") :])
        except ValueError:
            return "broken stream", line
        if isinstance(event, dict) and "error" in event:
            return "stream error event", str(event.get("error"))
        last = event if isinstance(event, dict) else None
    if last is None or not isinstance(last.get("generated_text"), str):
        return "stream cut short", text[-200:]
    return None, ""


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(_POLL_S)


# ------------------------------------------------------------------ endpoints
def endpoint_config(cfg: EndpointBenchConfig, name: str, **extra: Any) -> EndpointConfig:
    """One variant of `cfg.model` with one replica (`extra`: autoscaling and other endpoint keys)."""
    variant: dict[str, Any] = {"model": cfg.model, "replicas": 1, "dtype": cfg.dtype}
    if cfg.threads is not None:
        variant["threads"] = cfg.threads
    return EndpointConfig.model_validate(
        {"name": name, "drain_timeout_s": cfg.drain_timeout_s, "variants": [variant], **extra}
    )


@contextlib.contextmanager
def _endpoint(
    manager: LocalPlatform, config: EndpointConfig, *, controller: bool, progress: Progress
) -> Iterator[Endpoint]:
    """Create the endpoint (InService) and delete it when the block ends, however it ends."""
    try:
        yield manager.create(config, controller=controller, progress=progress)
    finally:
        progress(f"deleting endpoint {config.name!r}")
        manager.delete(config.name)


# ------------------------------------------------------------------ part 1: router overhead
def router_part(
    manager: LocalPlatform, cfg: EndpointBenchConfig, workdir: Path, progress: Progress
) -> RouterResult:
    with _endpoint(manager, endpoint_config(cfg, "bench-router"), controller=False, progress=progress) as ep:
        assert ep.url is not None  # InService: the router runs
        urls = {"router": ep.url, "direct": ep.replicas[0].url}
        conversations = chat_messages(cfg.concurrency)
        bench = chat_workload(ep.url, conversations, workdir, max_new_tokens=cfg.max_new_tokens)
        progress(f"warm-up: one unmeasured W{cfg.concurrency} run")
        _side(bench, urls["direct"])
        rounds = []
        for i in range(cfg.rounds):
            order: tuple[Literal["router", "direct"], ...] = (
                ("router", "direct") if i % 2 == 0 else ("direct", "router")
            )
            sides: dict[str, SideResult] = {}
            for side in order:
                progress(f"round {i + 1}/{cfg.rounds}: {side}")
                sides[side] = _side(bench, urls[side])
            rounds.append(RouterRound(first=order[0], router=sides["router"], direct=sides["direct"]))
    return RouterResult(
        model_version=ep.replicas[0].model_version,
        rounds=rounds,
        ratio_median=statistics.median(r.ratio for r in rounds),
        router_ttft_ms_p50=statistics.median(r.router.ttft_ms_p50 for r in rounds),
        direct_ttft_ms_p50=statistics.median(r.direct.ttft_ms_p50 for r in rounds),
    )


def _side(bench: ServeBenchConfig, url: str) -> SideResult:
    report = serve_bench(bench.model_copy(update={"url": url}))
    if report.failed or report.ttft_ms is None:
        raise RuntimeError(
            f"W{bench.concurrency} against {url} failed: {report.errors} {report.error_messages}"
        )
    return SideResult(tokens_per_s=report.output_token_throughput, ttft_ms_p50=report.ttft_ms.p50)


# ------------------------------------------------------------------ part 2: update under load
def update_part(
    manager: LocalPlatform, cfg: EndpointBenchConfig, workdir: Path, progress: Progress
) -> UpdateResult:
    name = "bench-update"
    with _endpoint(manager, endpoint_config(cfg, name), controller=False, progress=progress) as ep:
        assert ep.url is not None
        generation_of = {r.id: r.generation for r in ep.replicas}
        with LoadClients(ep.url, cfg.update_clients, cfg.update_max_new_tokens) as load:
            progress(f"{cfg.update_clients} clients: waiting for traffic")
            load.wait_ok(2 * cfg.update_clients, 300)
            target = manager.config_with_model(name, cfg.model)
            began = time.monotonic()
            after = manager.update(name, target, progress=progress)
            ended = time.monotonic()
            progress("traffic after the update")
            load.wait_ok(2 * cfg.update_clients, 120, since=ended)
        generation_of |= {r.id: r.generation for r in after.replicas}
    outcomes = load.outcomes
    during = [o for o in outcomes if o.end >= began and o.start <= ended]
    failed = [o for o in outcomes if o.error is not None]
    served = Counter(str(generation_of.get(o.replica or "", "?")) for o in outcomes if o.error is None)
    return UpdateResult(
        update_s=ended - began,
        clients=cfg.update_clients,
        ok=len(outcomes) - len(failed),
        failed=len(failed),
        ok_during_update=sum(o.error is None for o in during),
        failed_during_update=sum(o.error is not None for o in during),
        failures=dict(Counter(o.error for o in failed if o.error)),
        first_failures=[f"{o.error}: {o.detail}" for o in failed[:5]],
        served_by=dict(served),
        versions=(ep.replicas[0].model_version, after.replicas[0].model_version if after.replicas else None),
        generation=after.generation,
    )


# ------------------------------------------------------------------ part 3: load spike → new replica
def scale_part(
    manager: LocalPlatform, cfg: EndpointBenchConfig, workdir: Path, progress: Progress
) -> ScaleResult:
    name = "bench-scale"
    policy = {
        "type": "target_tracking",
        "target": cfg.scale_target,
        "min_replicas": 1,
        "max_replicas": 2,
        "lookback_s": 5,
        "scale_out_cooldown_s": 5,
        "scale_in_cooldown_s": 3600,  # no scale-in while the numbers are taken
    }
    config = endpoint_config(cfg, name, autoscaling=policy)
    with _endpoint(manager, config, controller=True, progress=progress) as ep:
        assert ep.url is not None
        first = {r.id for r in ep.replicas}
        ready_at: datetime | None = None
        new_id: str | None = None
        progress(f"burst: {cfg.burst} streams")
        burst_wall = utcnow()
        with LoadClients(ep.url, cfg.burst, cfg.max_new_tokens, streaming="all") as load:
            burst_mono = time.monotonic()
            with contextlib.suppress(TimeoutError):
                _wait(lambda: _healthy(manager, name) >= 2, cfg.scale_timeout_s, "a second healthy replica")
                ready_at = utcnow()
            fresh = [r for r in manager.describe(name).replicas if r.id not in first]
            if ready_at is not None and fresh:
                new_id = fresh[0].id
                progress("waiting for the router to send the new replica a request")
                with contextlib.suppress(TimeoutError):
                    _wait(lambda: any(o.replica == new_id for o in load.outcomes), 60, "traffic")
        events = [e for e in manager.events(name, limit=None) if e.to_replicas > e.from_replicas]
    event = events[0] if events else None
    started = fresh[0].started_at if fresh else None
    answers = [o.answered for o in load.outcomes if o.replica == new_id and o.answered is not None]
    failed = [o for o in load.outcomes if o.error is not None]
    return ScaleResult(
        burst=cfg.burst,
        seconds_to_healthy=_after(burst_wall, ready_at),
        decision_s=_after(burst_wall, event.time if event else None),
        replica_started_s=_after(burst_wall, started),
        replica_start_s=_after(started, ready_at) if started else None,
        first_answer_s=min(answers) - burst_mono if answers else None,
        event_reason=event.reason if event else None,
        metric_value=event.metric_value if event else None,
        ok=len(load.outcomes) - len(failed),
        failed=len(failed),
        failures=dict(Counter(o.error for o in failed if o.error)),
    )


def _healthy(manager: LocalPlatform, name: str) -> int:
    return manager.describe(name).variants[0].current_replicas


def _after(start: datetime, moment: datetime | None) -> float | None:
    return None if moment is None else (moment - start).total_seconds()


# ------------------------------------------------------------------ the run
PartRunner = Callable[[LocalPlatform, EndpointBenchConfig, Path, Progress], BaseModel]
RUNNERS: dict[Part, PartRunner] = {"router": router_part, "update": update_part, "scale": scale_part}


def run_endpoint_bench(cfg: EndpointBenchConfig, progress: Progress = _quiet) -> EndpointBenchReport:
    """Run the chosen parts in order; a part that fails is reported in `errors`, the others still run.

    Ctrl-C (or SIGTERM) stops the run after deleting the endpoint in progress.
    """
    report = EndpointBenchReport(config=cfg, started_at=utcnow(), cpu_count=os.cpu_count())
    with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="twinserve-bench-endpoint-") as tmp:
        home = Path(tmp)
        store = StateStore(home / "endpoints" / "state.db")
        manager = LocalPlatform(store, LocalRuntime(store, home=home))
        try:
            for part in PARTS:
                if part not in cfg.parts:
                    continue
                progress(f"{part}: starting")
                runner = RUNNERS[part]
                if cfg.platform == "ray":
                    from twinserve.bench.ray_bench import ray_proxy_part

                    runner = ray_proxy_part
                try:
                    result = runner(manager, cfg, home, progress)
                except Exception as exc:
                    report.errors[part] = f"{type(exc).__name__}: {exc}"
                    progress(f"{part} failed: {exc}")
                    continue
                setattr(report, part, result)
        finally:  # belt and braces: each part deletes its own endpoint already
            from twinserve.platforms import get_platform

            for endpoint in store.list_endpoints():
                get_platform(endpoint.config.platform.type, store).delete(endpoint.name)
    return report
