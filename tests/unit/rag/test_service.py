"""The RAG service over real parts: a `twinserve serve` app on the tiny model (uvicorn, real
HTTP), Qdrant local mode, the bundled MiniLM, the RAG app itself under uvicorn."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ThreadServer, asgi_in_thread, serve_config, thread_server
from twinserve.client import LLMClient
from twinserve.errors import ModelError, UnauthorizedError, ValidationError
from twinserve.rag.app import create_rag_app
from twinserve.rag.ask import ask
from twinserve.rag.embed import Embedder
from twinserve.rag.ingest import Ingestor
from twinserve.rag.settings import RagSettings
from twinserve.rag.store import VectorStore

MAX_TOTAL = 512  # the tiny model's max_position_embeddings
MAX_INPUT = 448
KEY = "rag-test-key"

TOPICS = {
    "bread.md": "# Baking bread\n\nSourdough rises with a starter of wild yeast. Bake it in a hot oven.",
    "bikes.md": "# Bicycle repair\n\nTo fix a flat tyre, lever the tyre off the rim and patch the tube.",
    "tea.md": "# Green tea\n\nBrew green tea at eighty degrees for two minutes; boiling water makes it bitter.",
    "chess.md": "# Chess\n\nControl the centre with pawns and knights in the opening.",
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> Iterator[ThreadServer]:
    config = serve_config(tiny_model_dir, max_input_tokens=MAX_INPUT, max_total_tokens=MAX_TOTAL)
    with thread_server(config) as server:
        yield server


@pytest.fixture(scope="module")
def rag_store(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[VectorStore]:
    """The corpus above plus `long.md` (many chunks, for trimming) and its duplicate."""
    root = tmp_path_factory.mktemp("rag-corpus")
    for name, text in TOPICS.items():
        (root / name).write_text(text)
    paragraph = (
        "Green tea leaves are steamed or pan-fired soon after picking, which keeps them green. "
        "The water temperature and the steeping time decide how the tea tastes. "
    )
    (root / "long.md").write_text(
        "# Tea notes\n\n" + "\n\n".join(f"{paragraph} Note {i}." for i in range(40))
    )
    (root / "copy").mkdir()
    (root / "copy" / "tea.md").write_text(TOPICS["tea.md"])
    settings = RagSettings(qdrant_path=tmp_path_factory.mktemp("rag-qdrant") / "q", qdrant_url=None)
    store = VectorStore(settings)
    Ingestor(settings, embedder, store).ingest([root])
    yield store
    store.close()


def _app(llm_url: str, embedder: Embedder, store: VectorStore, **kwargs: Any) -> Any:
    settings = RagSettings(qdrant_url=None)
    return create_rag_app(settings, LLMClient(llm_url), embedder=embedder, store=store, **kwargs)


@pytest.fixture(scope="module")
def rag(llm: ThreadServer, embedder: Embedder, rag_store: VectorStore) -> Iterator[str]:
    with asgi_in_thread(_app(llm.url, embedder, rag_store, api_key=KEY), "test-rag") as url:
        yield url


def _post(url: str, path: str, body: dict[str, Any], key: str | None = KEY, **headers: str) -> httpx.Response:
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def _events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_rag_answers_with_sources_in_score_order_within_the_model_limits(rag: str) -> None:
    r = _post(
        rag, "/rag", {"query": "how hot should the water be for green tea?", "k": 3, "max_new_tokens": 16}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str)
    sources = body["sources"]
    assert 1 <= len(sources) <= 3
    scores = [s["score"] for s in sources]
    assert scores == sorted(scores, reverse=True)
    assert any("tea" in s["source"] for s in sources)
    usage = body["usage"]
    # the LLM's own count of the prompt it got, within its limits
    assert usage["prompt_tokens"] + 16 <= MAX_TOTAL and usage["prompt_tokens"] <= MAX_INPUT
    assert usage["completion_tokens"] == 16 or body["finish_reason"] != "length"
    assert body["model"]["name"]
    assert body["timings"]["retrieval_ms"] > 0 and body["timings"]["llm_ms"] > 0
    assert r.headers["x-request-id"] == body["request_id"]


def test_the_stream_sends_sources_then_tokens_then_done_and_matches_the_json_answer(rag: str) -> None:
    query = {"query": "how do I fix a flat tyre?", "k": 2, "max_new_tokens": 12, "temperature": 0}
    whole = _post(rag, "/rag", query).json()
    r = _post(rag, "/rag", {**query, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "sources" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
    assert [s["id"] for s in events[0][1]["sources"]] == [s["id"] for s in whole["sources"]]
    assert "".join(data["text"] for kind, data in events if kind == "token") == whole["answer"]
    assert events[-1][1]["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]


def test_a_long_context_is_trimmed_by_tokens_so_the_llm_accepts_it(rag: str) -> None:
    r = _post(
        rag,
        "/rag",
        {
            "query": "tea notes on steeping",
            "k": 12,
            "max_new_tokens": 64,
            "rerank": False,
            "return_prompt": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    assert usage["dropped_chunks"] > 0  # 12 chunks of tea notes cannot fit in 448 - 64 tokens
    assert usage["prompt_tokens"] + 64 <= MAX_TOTAL
    assert usage["context_chunks"] == len(body["sources"]) >= 1
    context = body["prompt"][-1]["content"]
    for number, source in enumerate(body["sources"], 1):
        assert f"[{number}] {source['title']} ({source['source']})\n{source['text']}" in context


def test_max_new_tokens_over_the_model_limit_is_a_422(rag: str) -> None:
    r = _post(rag, "/rag", {"query": "tea", "max_new_tokens": MAX_TOTAL})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation" and "max_new_tokens" in r.json()["error"]


def test_search_filters_and_mmr_drops_the_duplicate(rag: str) -> None:
    plain = _post(rag, "/search", {"query": "green tea brewing temperature", "k": 3, "rerank": False}).json()
    texts = [s["text"] for s in plain["sources"]]
    assert len(texts) != len(set(texts))  # tea.md and copy/tea.md are the same text
    mmr = _post(rag, "/search", {"query": "green tea brewing temperature", "k": 3}).json()
    texts = [s["text"] for s in mmr["sources"]]
    assert len(texts) == len(set(texts))
    assert mmr["timings"]["rerank_ms"] is not None and plain["timings"]["rerank_ms"] is None
    bikes = _post(rag, "/search", {"query": "flat bicycle tyre", "k": 1}).json()["sources"][0]["source"]
    assert bikes.endswith("bikes.md")
    only = _post(rag, "/search", {"query": "tea", "k": 5, "filters": {"source": bikes}}).json()
    assert only["sources"] and {s["source"] for s in only["sources"]} == {bikes}


@pytest.mark.parametrize(
    "body",
    [
        {"query": ""},
        {"query": "x", "k": 0},
        {"query": "x", "colour": "red"},
        {"k": 3},
        {"query": "x", "temperature": 9},
    ],
)
def test_bad_bodies_are_422_naming_the_field(rag: str, body: dict[str, Any]) -> None:
    r = _post(rag, "/rag", body)
    assert r.status_code == 422
    data = r.json()
    assert data["error_type"] == "validation" and "Traceback" not in r.text


def test_the_api_key_is_required_on_rag_and_search_but_not_on_health(rag: str) -> None:
    assert _post(rag, "/rag", {"query": "tea"}, key=None).status_code == 401
    assert _post(rag, "/search", {"query": "tea"}, key="wrong").status_code == 401
    assert _post(rag, "/search", {"query": "tea"}, key=None, **{"x-api-key": KEY}).status_code == 200
    health = httpx.get(rag + "/health")
    assert health.status_code == 200 and health.json()["vector_store"]["chunks"] > 0


def test_the_request_id_goes_on_to_the_llm(rag: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="twinserve.access"):
        r = _post(
            rag,
            "/rag",
            {"query": "chess opening", "k": 1, "max_new_tokens": 4},
            **{"x-request-id": "trace-42"},
        )
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    llm_ids = {getattr(rec, "request_id", None) for rec in caplog.records if rec.name == "twinserve.access"}
    assert "trace-42" in llm_ids  # the LLM server logged the same id for its calls


def test_metrics_count_requests_and_time_retrieval(rag: str) -> None:
    _post(rag, "/search", {"query": "bread"})
    text = httpx.get(rag + "/metrics").text
    assert 'rag_requests_total{route="/search",status="200"}' in text
    assert "rag_retrieval_duration_seconds_count" in text


def test_a_stopped_llm_is_424_from_rag_and_503_from_health(
    tiny_model_dir: Path, embedder: Embedder, rag_store: VectorStore
) -> None:
    config = serve_config(tiny_model_dir, max_input_tokens=MAX_INPUT, max_total_tokens=MAX_TOTAL)
    with contextlib.ExitStack() as llm_running:
        server = llm_running.enter_context(thread_server(config))
        with asgi_in_thread(_app(server.url, embedder, rag_store), "test-rag-2") as rag_url:
            assert _post(rag_url, "/rag", {"query": "tea", "max_new_tokens": 2}, key=None).status_code == 200
            llm_running.close()  # the LLM stops; the RAG service keeps running

            r = _post(rag_url, "/rag", {"query": "tea", "max_new_tokens": 2}, key=None)
            assert r.status_code == 424, r.text
            body = r.json()
            assert body["error_type"] == "llm_failed" and "Traceback" not in r.text
            assert body["llm"]["error_type"] == "unreachable" and body["llm"]["status"] is None
            streamed = _post(rag_url, "/rag", {"query": "tea", "stream": True}, key=None)
            assert streamed.status_code == 424  # failed before the first byte: still a status
            health = httpx.get(rag_url + "/health")
            assert health.status_code == 503
            assert health.json()["down"] == ["llm"] and health.json()["vector_store"]["ok"] is True
            # retrieval alone still works without the LLM
            assert _post(rag_url, "/search", {"query": "tea"}, key=None).status_code == 200
            # `twinserve rag ask` raises the client's typed error for it, streamed or not
            for on_token in (None, lambda _: None):
                with pytest.raises(ModelError, match="LLM") as failed:
                    ask(rag_url, {"query": "tea", "max_new_tokens": 2}, on_token=on_token)
                assert failed.value.status_code == 424


def test_rag_ask_answers_like_the_route_and_maps_errors_to_typed_ones(rag: str) -> None:
    body = {"query": "How do I brew green tea?", "max_new_tokens": 4}
    answer = ask(rag, body, api_key=KEY)
    streamed_tokens: list[str] = []
    streamed = ask(rag, body, api_key=KEY, on_token=streamed_tokens.append)
    assert answer["answer"] == streamed["answer"] == "".join(streamed_tokens)
    assert [s["source"] for s in answer["sources"]] == [s["source"] for s in streamed["sources"]]
    with pytest.raises(UnauthorizedError):
        ask(rag, body, api_key="wrong")
    with pytest.raises(ValidationError, match="max_new_tokens") as invalid:
        ask(rag, {**body, "max_new_tokens": MAX_TOTAL}, api_key=KEY)
    assert invalid.value.status_code == 422


def test_the_monolith_runs_the_llm_in_process_with_the_same_api(
    tiny_model_dir: Path, embedder: Embedder, rag_store: VectorStore
) -> None:
    from tests.servers import until
    from twinserve.client import HttpTransport
    from twinserve.server.app import create_app

    llm_app = create_app(serve_config(tiny_model_dir, max_input_tokens=MAX_INPUT, max_total_tokens=MAX_TOTAL))
    client = LLMClient(transport=HttpTransport("http://llm.in-process", app=llm_app))
    app = create_rag_app(
        RagSettings(qdrant_url=None), client, embedder=embedder, store=rag_store, hosted=[llm_app]
    )
    with asgi_in_thread(app, "test-rag-mono") as url:
        assert until(lambda: httpx.get(url + "/health").status_code == 200, 60)
        query = {"query": "how do I brew green tea?", "k": 2, "max_new_tokens": 8}
        whole = _post(url, "/rag", query, key=None)
        assert whole.status_code == 200, whole.text
        events = _events(_post(url, "/rag", {**query, "stream": True}, key=None))
        assert [kind for kind, _ in events][0] == "sources" and events[-1][0] == "done"
        assert "".join(d["text"] for kind, d in events if kind == "token") == whole.json()["answer"]
        assert whole.json()["sources"]


def test_query_expansion_asks_the_llm_and_searches_each_rephrasing(rag: str) -> None:
    r = _post(rag, "/search", {"query": "green tea temperature", "k": 2, "expand": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["queries"][0] == "green tea temperature" and len(body["queries"]) <= 3
    assert body["timings"]["expand_ms"] is not None and body["sources"]
    off = _post(rag, "/search", {"query": "green tea temperature", "k": 2}).json()
    assert off["timings"]["expand_ms"] is None and off["queries"] == ["green tea temperature"]


def test_logs_never_carry_the_query_text(rag: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "my-very-private-question-about-tea"
    with caplog.at_level(logging.DEBUG):
        assert _post(rag, "/rag", {"query": secret, "k": 1, "max_new_tokens": 2}).status_code == 200
    assert any(rec.name == "twinserve.rag.access" for rec in caplog.records)
    for record in caplog.records:
        assert secret not in record.getMessage() and secret not in str(record.__dict__)
