"""The router in front of real replicas (tiny Llama servers in threads), over real HTTP."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.servers import ThreadServer, asgi_in_thread, serve_config, thread_server, until
from twinserve.platforms.local.router.app import REPLICA_HEADER, RouterApp, create_router_app
from twinserve.platforms.local.router.pool import ReplicaPool, ReplicaSpec
from twinserve.server.process import free_port

# long enough that it cannot finish while a test holds it (the tiny model is fast)
LONG = {"inputs": "hello", "parameters": {"max_new_tokens": 3900, "ignore_eos": True}}
SHORT = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 8, "ignore_eos": True}}


def _config(model: Path) -> Any:
    return serve_config(model, max_total_tokens=4000, max_batch_total_tokens=20000, warmup=False)


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: Path) -> Iterator[list[ThreadServer]]:
    with thread_server(_config(tiny_model_dir)) as a, thread_server(_config(tiny_model_dir)) as b:
        yield [a, b]


def _specs(servers: list[ThreadServer], names: str = "ab") -> list[ReplicaSpec]:
    return [ReplicaSpec(id=n, url=s.url) for n, s in zip(names, servers, strict=True)]


@contextlib.contextmanager
def running_router(pool: ReplicaPool, **options: Any) -> Iterator[tuple[str, RouterApp]]:
    """The router under uvicorn in a thread (lifespan on: health checks run)."""
    options.setdefault("health_interval", 0.2)
    app = create_router_app(pool, **options)
    with asgi_in_thread(app, "test-router") as url:
        yield url, app


def _states(url: str) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in httpx.get(f"{url}/router/replicas").json()["replicas"]}


def _idle(server: ThreadServer) -> bool:
    return bool(server.service.engine.engine.num_in_flight == 0)


def _cancelled(servers: list[ThreadServer]) -> float:
    """Generations the replicas aborted because their client (the router) went away."""
    total = 0.0
    for server in servers:
        for metric in server.service.metrics.registry.collect():
            for sample in metric.samples:
                if sample.name == "tgi_request_failure" and sample.labels.get("err") == "cancelled":
                    total += sample.value
    return total


def _first_event(lines: Iterator[str]) -> dict[str, Any]:
    line = next(line for line in lines if line.startswith("data:"))
    return dict(json.loads(line.removeprefix("data:")))


def _events(text: str) -> list[str]:
    return [line.removeprefix("data:").strip() for line in text.splitlines() if line.startswith("data:")]


def test_unary_routes_answer_as_the_replica_does(replicas: list[ThreadServer]) -> None:
    with running_router(ReplicaPool(_specs(replicas))) as (url, _):
        direct = httpx.post(f"{replicas[0].url}/generate", json=SHORT, timeout=30)
        routed = httpx.post(f"{url}/generate", json=SHORT, headers={"x-request-id": "rid-1"}, timeout=30)
        assert routed.status_code == 200 and routed.json() == direct.json()
        assert routed.headers["x-request-id"] == "rid-1"
        assert routed.headers[REPLICA_HEADER] in ("a", "b")
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
        # either replica may answer: compare what both share (`created` is each one's load time)
        assert (
            httpx.get(f"{url}/info").json()["model_id"]
            == httpx.get(f"{replicas[0].url}/info").json()["model_id"]
        )
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == [
            m["id"] for m in httpx.get(f"{replicas[0].url}/v1/models").json()["data"]
        ]
        assert httpx.get(f"{url}/ping").status_code == 200
        tokens = httpx.post(f"{url}/tokenize", json={"inputs": "hello world"})
        assert (
            tokens.json() == httpx.post(f"{replicas[1].url}/tokenize", json={"inputs": "hello world"}).json()
        )
        assert httpx.post(f"{url}/invocations", json=SHORT, timeout=30).status_code == 200
        assert "tgi_request_count" in httpx.get(f"{url}/metrics").text
        # a replica's own errors pass through unchanged (and are not retried)
        bad = httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"top_p": 7}})
        assert bad.status_code == 422 and bad.json()["error_type"] == "validation"
        assert httpx.get(f"{url}/no/such/route?x=1").status_code == 404


def test_streams_pass_through_event_by_event(replicas: list[ThreadServer]) -> None:
    with running_router(ReplicaPool(_specs(replicas))) as (url, _):
        direct = httpx.post(f"{replicas[0].url}/generate_stream", json=SHORT, timeout=30)
        routed = httpx.post(f"{url}/generate_stream", json=SHORT, timeout=30)
        assert routed.headers["content-type"].startswith("text/event-stream")
        assert [json.loads(e)["token"]["text"] for e in _events(routed.text)] == [
            json.loads(e)["token"]["text"] for e in _events(direct.text)
        ]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        assert _events(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30).text)[-1] == "[DONE]"
        # the first token arrives while the replica is still generating: nothing is buffered
        with httpx.stream("POST", f"{url}/generate_stream", json=LONG, timeout=30) as r:
            lines = r.iter_lines()
            assert _first_event(lines)["index"] == 1
            served_by = next(s for n, s in zip("ab", replicas, strict=True) if n == r.headers[REPLICA_HEADER])
            assert served_by.service.engine.engine.num_in_flight == 1


def test_least_outstanding_spreads_streams_and_disconnects_abort_them(replicas: list[ThreadServer]) -> None:
    before = _cancelled(replicas)
    with running_router(ReplicaPool(_specs(replicas))) as (url, _), httpx.Client(timeout=30) as client:
        with contextlib.ExitStack() as stack:
            held = []
            for _ in range(4):
                r = stack.enter_context(client.stream("POST", f"{url}/generate_stream", json=LONG))
                lines = r.iter_lines()  # kept: dropping the iterator would close the stream
                _first_event(lines)
                held.append(lines)
            states = _states(url)
            assert [states[n]["outstanding"] for n in "ab"] == [2, 2]
            assert all(s.service.engine.engine.num_in_flight == 2 for s in replicas)
        # the client left: the router closed upstream and the replicas aborted their generations
        assert until(lambda: all(_idle(s) for s in replicas))
        assert until(lambda: all(r["outstanding"] == 0 for r in _states(url).values()))
        assert _cancelled(replicas) == before + 4
        # a unary client that gives up aborts its generation too
        with pytest.raises(httpx.ReadTimeout):
            client.post(f"{url}/generate", json=LONG, timeout=httpx.Timeout(30, read=0.3))
        assert until(lambda: _cancelled(replicas) == before + 5)
        assert until(lambda: all(_idle(s) for s in replicas))
        assert until(lambda: all(r["outstanding"] == 0 for r in _states(url).values()))


def test_a_dead_replica_is_skipped_by_retry_and_marked_unhealthy(
    replicas: list[ThreadServer], tiny_model_dir: Path
) -> None:
    pool = ReplicaPool([ReplicaSpec(id="live", url=replicas[0].url)])
    # long interval: only the failed forwarded requests can notice the dead replica
    with running_router(pool, health_interval=600) as (url, app):
        with thread_server(_config(tiny_model_dir)) as doomed:
            pool.add(ReplicaSpec(id="doomed", url=doomed.url))
            assert _states(url)["doomed"]["status"] == "starting"
            assert app.health is not None
            app.health.check_soon()
            assert until(lambda: _states(url)["doomed"]["healthy"])
        for _ in range(6):
            r = httpx.post(f"{url}/generate", json=SHORT, timeout=30)
            assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "live"
        states = _states(url)
        assert states["doomed"]["healthy"] is False and states["doomed"]["failures"] == 1
        assert states["doomed"]["status"] == "unhealthy" and states["doomed"]["last_error"]
        assert states["doomed"]["outstanding"] == 0 and states["live"]["healthy"] is True
        assert httpx.get(f"{url}/health").status_code == 200


def test_no_healthy_replica_is_a_503_in_the_callers_format(replicas: list[ThreadServer]) -> None:
    dead = ReplicaSpec(id="dead", url=f"http://127.0.0.1:{free_port()}")
    with running_router(ReplicaPool([dead])) as (url, _):
        r = httpx.post(f"{url}/generate", json=SHORT)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error_type"] == "unhealthy" and r.json()["error"]
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["replicas"][0]["status"] == "starting"


def test_a_draining_replica_finishes_its_stream_but_takes_no_new_requests(
    replicas: list[ThreadServer],
) -> None:
    pool = ReplicaPool(_specs(replicas))
    params = {"max_new_tokens": 2000, "ignore_eos": True}  # outlasts the checks below
    with running_router(pool) as (url, _), httpx.Client(timeout=60) as client:
        with client.stream(
            "POST", f"{url}/generate_stream", json={"inputs": "hi", "parameters": params}
        ) as r:
            lines = r.iter_lines()
            _first_event(lines)
            old = r.headers[REPLICA_HEADER]
            other = "b" if old == "a" else "a"
            pool.remove(old)
            assert _states(url)[old]["status"] == "draining"
            for _ in range(3):
                assert client.post(f"{url}/generate", json=SHORT).headers[REPLICA_HEADER] == other
            last = json.loads(_events("\n".join(lines))[-1])
            assert last["generated_text"] is not None and last["index"] == 2000
        assert until(lambda: pool.is_drained(old))
        assert set(_states(url)) == {other}


def test_blue_green_set_replicas_shifts_traffic_by_weight(replicas: list[ThreadServer]) -> None:
    blue = [ReplicaSpec(id="blue-0", url=replicas[0].url, variant="blue")]
    pool = ReplicaPool(blue)
    with running_router(pool) as (url, app), httpx.Client(timeout=30) as client:
        green = ReplicaSpec(id="green-0", url=replicas[1].url, variant="green")
        pool.set_replicas([*blue, green], weights={"blue": 3, "green": 1})
        assert app.health is not None
        app.health.check_soon()
        assert until(lambda: _states(url)["green-0"]["healthy"])
        served = [
            client.post(f"{url}/tokenize", json={"inputs": "x"}).headers[REPLICA_HEADER] for _ in range(8)
        ]
        assert served.count("blue-0") == 6 and served.count("green-0") == 2
        pool.set_replicas([green])
        assert until(lambda: set(_states(url)) == {"green-0"})
        assert client.post(f"{url}/generate", json=SHORT).headers[REPLICA_HEADER] == "green-0"


def test_api_key_is_checked_by_the_router_on_generation_routes(replicas: list[ThreadServer]) -> None:
    with running_router(ReplicaPool(_specs(replicas)), api_key="s3cret") as (url, _):
        r = httpx.post(f"{url}/generate", json=SHORT)
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        assert httpx.get(f"{url}/router/replicas").status_code == 401
        ok = httpx.post(f"{url}/generate", json=SHORT, headers={"authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/info").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200  # TGI's health route stays open
        assert httpx.post(f"{url}/", json=SHORT).status_code == 401  # TGI's compat generation does not


def test_router_health_lists_replica_states(replicas: list[ThreadServer]) -> None:
    with running_router(ReplicaPool(_specs(replicas))) as (url, _):
        health = httpx.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["healthy"] is True
        listing = httpx.get(f"{url}/router/replicas").json()["replicas"]
        assert [(r["id"], r["url"], r["variant"]) for r in listing] == [
            ("a", replicas[0].url, "default"),
            ("b", replicas[1].url, "default"),
        ]
        keys = {"healthy", "draining", "outstanding", "served", "failures", "status", "last_error"}
        assert all(keys <= set(r) for r in listing)


async def _draining_replica(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A replica that passes health checks but answers 503 not_ready, like one that just got SIGTERM."""
    if scope["type"] != "http":
        return
    status, body = (
        (200, b"{}")
        if scope["path"] == "/health"
        else (503, b'{"error":"draining","error_type":"not_ready"}')
    )
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def _serving(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert until(lambda: server.started, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_503_from_a_replica_is_retried_on_another(replicas: list[ThreadServer]) -> None:
    with _serving(_draining_replica) as draining_url:
        pool = ReplicaPool(
            [ReplicaSpec(id="draining", url=draining_url), ReplicaSpec(id="a", url=replicas[0].url)]
        )
        with running_router(pool, health_interval=30) as (url, _):
            assert until(lambda: pool.num_available() == 2)
            for _ in range(4):  # whichever replica is picked first, every request is answered by "a"
                r = httpx.post(f"{url}/generate", json=SHORT, timeout=60)
                assert r.status_code == 200 and r.headers[REPLICA_HEADER] == "a"
            assert _states(url)["draining"]["healthy"] is False

    with _serving(_draining_replica) as draining_url:  # alone: its 503 is what the caller gets
        pool = ReplicaPool([ReplicaSpec(id="draining", url=draining_url)])
        with running_router(pool, health_interval=30) as (url, _):
            assert until(lambda: pool.num_available() == 1)
            r = httpx.post(f"{url}/generate", json=SHORT, timeout=60)
            assert r.status_code == 503 and r.json()["error_type"] == "not_ready"


def test_router_stats_count_load_per_traffic_group(replicas: list[ThreadServer]) -> None:
    pool = ReplicaPool(
        [
            ReplicaSpec(id="a", url=replicas[0].url, variant="v@1"),
            ReplicaSpec(id="b", url=replicas[1].url, variant="v@2"),
        ],
        weights={"v@1": 1, "v@2": 0},
    )
    with running_router(pool) as (url, _):
        assert until(lambda: pool.num_available() == 2)
        for _ in range(3):
            assert httpx.post(f"{url}/generate", json=SHORT, timeout=60).status_code == 200
        stats = httpx.get(f"{url}/router/stats").json()
    assert stats["groups"]["v@1"] == {"replicas": 1, "in_flight": 0, "routed_total": 3}
    assert stats["groups"]["v@2"] == {"replicas": 1, "in_flight": 0, "routed_total": 0}
    assert stats["weights"] == {"v@1": 1, "v@2": 0}


def test_the_payload_limit_is_enforced_before_the_body_reaches_a_replica(
    replicas: list[ThreadServer],
) -> None:
    pool = ReplicaPool(_specs(replicas))
    requests_before = [s.service.metrics._counters.request_count for s in replicas]
    big = {"inputs": "x" * 5000}

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while reading
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    with running_router(pool, payload_limit=1000) as (url, _):
        r = httpx.post(f"{url}/generate", json=big, timeout=30)
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 5000}, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        headers = {"content-type": "application/json"}
        r = httpx.post(f"{url}/generate", content=chunked(), headers=headers, timeout=30)
        assert r.status_code == 413
        small = httpx.post(f"{url}/generate", json=SHORT, timeout=30)
        assert small.status_code == 200
    requests_after = [s.service.metrics._counters.request_count for s in replicas]
    assert sum(requests_after) - sum(requests_before) == 1  # only the small one got through


def test_async_routes_need_a_job_service_and_the_router_lives_without_replicas() -> None:
    with running_router(ReplicaPool([])) as (url, app):
        assert httpx.get(f"{url}/health").status_code == 503  # no replica
        assert httpx.get(f"{url}/router/live").status_code == 200  # but the router serves
        refused = httpx.post(f"{url}/async-invocations", json={"inputs": "hi"})
        assert refused.status_code == 404
        assert "real-time only" in refused.json()["error"]
        app.async_upstream = f"http://127.0.0.1:{free_port()}"  # a job service that is down
        down = httpx.post(f"{url}/async-invocations", json={"inputs": "hi"})
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        too_big = httpx.post(f"{url}/async-invocations", content=b"x" * (6 * 1024 * 1024 + 1))
        assert too_big.status_code == 413


def _refusing_replica(name: str, hits: list[str], status: int = 503) -> Any:
    """A replica that passes health checks and answers every other request with `status` (503:
    not_ready, as one that just got SIGTERM), recording each request it got in `hits`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            code, body = 200, b"{}"
        else:
            hits.append(name)
            error_type = "not_ready" if status == 503 else "internal"
            code, body = (
                status,
                json.dumps({"error": f"refused by {name}", "error_type": error_type}).encode(),
            )
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize("max_attempts", [3, 1])
def test_a_request_every_replica_refuses_is_tried_on_at_most_max_attempts_of_them(max_attempts: int) -> None:
    """Five replicas all answering 503: the request goes to `max_attempts` distinct ones, once
    each (never a retry storm over the whole pool), and the last refusal is what the caller gets."""
    hits: list[str] = []
    names = [f"r{i}" for i in range(5)]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(_serving(_refusing_replica(n, hits))) for n in names]
        pool = ReplicaPool([ReplicaSpec(id=n, url=u) for n, u in zip(names, urls, strict=True)])
        with running_router(pool, health_interval=600, max_attempts=max_attempts) as (url, _):
            assert until(lambda: pool.num_available() == 5)
            r = httpx.post(f"{url}/generate", json=SHORT, timeout=30)
            assert r.status_code == 503 and r.json()["error_type"] == "not_ready"
            assert len(hits) == max_attempts and len(set(hits)) == max_attempts, hits
            assert r.headers[REPLICA_HEADER] == hits[-1] and r.json()["error"] == f"refused by {hits[-1]}"
            # each refusal but the relayed one took its replica out of rotation
            states = _states(url)
            assert sorted(n for n in names if not states[n]["healthy"]) == sorted(hits[:-1])


def test_an_error_a_replica_answered_is_relayed_and_never_retried() -> None:
    """A 500 (or any status but 503) means the replica ran the request: one attempt only."""
    hits: list[str] = []
    with _serving(_refusing_replica("a", hits, 500)) as a, _serving(_refusing_replica("b", hits, 500)) as b:
        pool = ReplicaPool([ReplicaSpec(id="a", url=a), ReplicaSpec(id="b", url=b)])
        with running_router(pool, health_interval=600) as (url, _):
            assert until(lambda: pool.num_available() == 2)
            r = httpx.post(f"{url}/generate", json=SHORT, timeout=30)
            assert r.status_code == 500 and len(hits) == 1 and r.headers[REPLICA_HEADER] == hits[0]


def test_unreachable_replicas_count_towards_the_attempt_cap() -> None:
    """Healthy replicas that then vanish (connection refused, before the health checker notices)
    are each tried once, `max_attempts` of them in all; the caller gets a 503 to retry."""
    hits: list[str] = []
    names = [f"r{i}" for i in range(4)]
    servers = contextlib.ExitStack()
    urls = [servers.enter_context(_serving(_refusing_replica(n, hits))) for n in names]
    pool = ReplicaPool([ReplicaSpec(id=n, url=u) for n, u in zip(names, urls, strict=True)])
    with running_router(pool, health_interval=600, max_attempts=2) as (url, _):
        try:
            assert until(lambda: pool.num_available() == 4)
        finally:
            servers.close()  # every replica is gone now; only a forwarded request can notice
        r = httpx.post(f"{url}/generate", json=SHORT, timeout=30)
        states = _states(url)
    assert r.status_code == 503 and r.json()["error_type"] == "unhealthy" and r.headers["retry-after"] == "1"
    tried = [n for n in names if states[n]["failures"]]
    assert len(tried) == 2 and all(states[n]["failures"] == 1 for n in tried) and hits == [], states
