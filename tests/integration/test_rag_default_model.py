"""The RAG service end to end on the default model, as a user runs it: `twinserve rag ingest
docs/`, a real `twinserve serve`, `twinserve rag serve --llm URL` as a process, then `/rag` and
`twinserve rag ask` about a command the docs describe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.servers import process_server
from twinserve.server.process import ServerProcess, free_port, wait_until_healthy

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "twinserve.cli.main"]
COLLECTION = "it-docs"
KEY = "rag-it-key"


@pytest.fixture(scope="module")
def rag_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    qdrant = tmp_path_factory.mktemp("rag-it") / "qdrant"
    env = {**os.environ, "TWINSERVE_RAG_QDRANT_PATH": str(qdrant)}
    env.pop("QDRANT_URL", None)
    return env


@pytest.fixture(scope="module")
def ingested(rag_env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [*CLI, "rag", "ingest", str(REPO_ROOT / "docs"), "--collection", COLLECTION, "--json"],
        env=rag_env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="module")
def llm(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("rag-llm") / "serve.log"
    with process_server(["--model", str(default_model_path)], log) as running:
        yield running


@pytest.fixture(scope="module")
def rag(
    ingested: dict[str, object],
    llm: ServerProcess,
    rag_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("rag-serve") / "rag.log").open("wb")
    process = subprocess.Popen(
        [*CLI, "rag", "serve", "--llm", llm.url, "--collection", COLLECTION, "--port", str(port), "--api-key", KEY],
        env=rag_env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_healthy(url, 240, gone=lambda: process.poll() is not None), "rag serve not healthy"
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0  # a clean stop on SIGTERM
        log.close()


def test_ingesting_docs_embeds_every_page(ingested: dict[str, object]) -> None:
    # idempotent re-ingest, changed files and prune are tested in tests/unit/rag/test_ingest.py
    docs = sorted((REPO_ROOT / "docs").glob("*.md"))
    assert ingested["files"] == len(docs) and int(ingested["chunks"]) > len(docs)  # type: ignore[call-overload]


def test_a_question_about_a_documented_command_finds_its_doc(rag: str) -> None:
    r = httpx.post(
        rag + "/rag",
        json={
            "query": "How do I run a batch transform job over a JSONL input file?",
            "k": 4,
            "max_new_tokens": 64,
        },
        headers={"authorization": f"Bearer {KEY}"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "docs/batch.md" in [s["source"] for s in body["sources"]]
    assert body["answer"].strip()
    assert body["model"]["name"] and body["usage"]["completion_tokens"] > 0


def test_rag_ask_prints_the_answer_and_its_sources(rag: str, rag_env: dict[str, str]) -> None:
    done = subprocess.run(
        [*CLI, "rag", "ask", "How do I queue an async job and read its result later?", "--url", rag,
         "--api-key", KEY, "--max-new-tokens", "32", "--stream"],
        env=rag_env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sources" in done.stdout and "docs/" in done.stdout
